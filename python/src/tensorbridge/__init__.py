"""TensorBridge: serve PyTorch models to PHP over a Unix socket and shared memory.

The public API is what this module exports; everything in ``tensorbridge._*`` is internal.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os
import sys as _sys

# The server shares its cores with PHP-FPM workers. libgomp's default has torch's idle
# threads spin at every barrier, which on a busy host burns the core a descheduled partner
# needs (ResNet-18 at 2 threads: ~200 ms of CPU per image under load instead of ~30 ms).
# libgomp reads this once, when torch loads, hence here; a value the user set wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._client import Client  # noqa: E402
from ._config import ServerConfig, default_socket_path  # noqa: E402
from ._errors import (  # noqa: E402
    ConnectionError,
    DeadlineExceededError,
    InternalError,
    InvalidInputError,
    ModelError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ProtocolError,
    TensorBridgeError,
    TimeoutError,
    UnauthorizedError,
)
from ._models import LoadedModel, ModelConfig, load_model  # noqa: E402
from ._settings import ConfigError  # noqa: E402
from ._signature import Signature, TensorSpec  # noqa: E402
from .server import Server  # noqa: E402

__all__ = [
    "Client",
    "ConfigError",
    "ConnectionError",
    "DeadlineExceededError",
    "InternalError",
    "InvalidInputError",
    "LoadedModel",
    "ModelConfig",
    "ModelError",
    "ModelNotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ProtocolError",
    "Server",
    "ServerConfig",
    "Signature",
    "TensorBridgeError",
    "TensorSpec",
    "TimeoutError",
    "UnauthorizedError",
    "__version__",
    "default_socket_path",
    "load_model",
]
