"""The per-connection shared-memory region: a sealed, anonymous memfd (spec §5)."""

from __future__ import annotations

import fcntl
import mmap
import os

import torch

from ._spec import PAGE

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


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
        return torch.frombuffer(self.mm, dtype=dtype, count=count, offset=offset).view(shape)

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
            # A model kept a view of its input; the mapping goes when that view is collected.
            pass
        os.close(self.fd)
