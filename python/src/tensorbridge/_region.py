"""The per-connection shared-memory region: a sealed, anonymous memfd (spec §5)."""

from __future__ import annotations

import fcntl
import gc
import mmap
import os

import numpy as np
import torch

from ._spec import PAGE

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_NUMPY = {torch.bool: np.bool_, torch.uint8: np.uint8, torch.int8: np.int8,
          torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
          torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


class Region:
    """A memfd of fixed size, mapped by the server and handed to one client.

    It has no name, so nothing can leak into /dev/shm; the seals stop a client from
    shrinking it under the server's mapping (which would kill the server with SIGBUS).
    """

    def __init__(self, size: int) -> None:
        self.size = -(-size // PAGE) * PAGE
        self.fd = os.memfd_create("tensorbridge-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self.mm = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        probe = torch.frombuffer(self.mm, dtype=torch.uint8, count=1)
        self.address = probe.data_ptr()
        del probe

    def view(self, dtype: torch.dtype, offset: int, count: int, shape: tuple[int, ...]
             ) -> torch.Tensor:
        """A tensor sharing the region's memory (no copy). Bounds are checked by the caller."""
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        np_dtype = _NUMPY.get(dtype)
        if np_dtype is None:  # bfloat16 has no numpy twin
            return torch.frombuffer(self.mm, dtype=dtype, count=count, offset=offset).view(shape)
        # numpy's view + from_numpy is ~1.5 µs cheaper than torch.frombuffer per tensor.
        return torch.from_numpy(np.frombuffer(self.mm, np_dtype, count, offset).reshape(shape))

    def read(self, offset: int, nbytes: int) -> bytes:
        """A copy of a byte range (for BYTES tensors and checksums)."""
        return self.mm[offset:offset + nbytes]

    def write(self, offset: int, data: bytes) -> None:
        """Copy bytes into the region."""
        self.mm[offset:offset + len(data)] = data

    def close(self) -> None:
        """Unmap and close. The memory is freed once the client has closed its copy too."""
        try:
            self.mm.close()
        except BufferError:
            # A view of the region is still referenced, typically from a reference cycle (an
            # exception's traceback); collect cycles once and retry. If a model really kept a
            # view, the mapping goes when that view is collected.
            gc.collect()
            try:
                self.mm.close()
            except BufferError:
                pass
        os.close(self.fd)
