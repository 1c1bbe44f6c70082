"""A vector index served as a model: the nearest neighbours of a query by one matrix product.

Served as ``tensorbridge.models.nearest:create`` with ``options = {path = "vectors.tbv"}``:
input ``query`` FP32 [n, dim] (unit vectors, e.g. ``minilm``'s embeddings); outputs ``scores``
FP32 [n, k] (cosine similarity, highest first) and ``ids`` INT64 [n, k] (the documents' ids),
k = ``top_k`` or fewer when the index holds fewer vectors.

The index is a file of fixed-size records that applications append to as they add documents
(examples/search/ writes one record per document into it beside PostgreSQL):

    header  8 bytes "TBVECS01", u32 dim, u32 0 (little-endian)
    record  i64 id, dim x f32 vector        (repeated)

Before each call the model looks at the file: new records at its end are read and added
(only those), a file replaced by another (a rebuild, renamed into place) is read again, and a
record still being written is left for the next call. Cost: one [n, dim] x [dim, N] product
and a top-k over N per call, about 2 x dim x N flops and dim x N x 4 bytes read: 60,000
documents of 384 values are 92 MB and a few milliseconds on one core.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

MAGIC = b"TBVECS01"
HEADER = struct.Struct("<8sII")


class NearestIndex(nn.Module):
    """Cosine nearest neighbours over the vectors of an append-only file."""

    def __init__(self, path: str, dim: int, top_k: int) -> None:
        super().__init__()
        self.path = Path(path)
        self.dim = dim
        self.top_k = top_k
        self.record = np.dtype([("id", "<i8"), ("vector", "<f4", (dim,))])
        self.ids = torch.empty(0, dtype=torch.int64)
        self.vectors = torch.empty(0, dim)
        self._file: tuple[int, int] | None = None  # (device, inode) read so far
        self._read_bytes = HEADER.size
        self.tensorbridge_signature = {
            "inputs": [{"name": "query", "datatype": "FP32", "shape": [-1, dim]}],
            "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
                        {"name": "ids", "datatype": "INT64", "shape": [-1, -1]}]}

    @property
    def count(self) -> int:
        """Vectors in the index now."""
        return int(self.ids.shape[0])

    def refresh(self) -> None:
        """Read what was appended to the file since the last call (all of it if replaced)."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below, after fstat decides
        except FileNotFoundError:
            self._file, self._read_bytes = None, HEADER.size
            self.ids, self.vectors = self.ids[:0], self.vectors[:0]
            return
        with f:
            # fstat of the open file: a rebuild renamed into place in between cannot mix the
            # identity of one file with the contents of another.
            stat = os.fstat(f.fileno())
            same = self._file == (stat.st_dev, stat.st_ino) and stat.st_size >= self._read_bytes
            if same and stat.st_size - self._read_bytes < self.record.itemsize:
                return  # nothing new (or only part of a record)
            if not same:
                self._check_header(f.read(HEADER.size))
                self.ids, self.vectors = self.ids[:0], self.vectors[:0]
                self._read_bytes = HEADER.size
            f.seek(self._read_bytes)
            whole = (stat.st_size - self._read_bytes) // self.record.itemsize
            records = np.frombuffer(f.read(whole * self.record.itemsize), dtype=self.record)
        self._file = (stat.st_dev, stat.st_ino)
        self._read_bytes += whole * self.record.itemsize
        self.ids = torch.cat([self.ids, torch.from_numpy(records["id"].copy())])
        self.vectors = torch.cat([self.vectors, torch.from_numpy(records["vector"].copy())])

    def _check_header(self, raw: bytes) -> None:
        if len(raw) < HEADER.size:
            raise ValueError(f"{self.path}: {len(raw)} bytes, not a vector file (no header)")
        magic, dim, _ = HEADER.unpack(raw)
        if magic != MAGIC or dim != self.dim:
            raise ValueError(f"{self.path}: not a {self.dim}-value vector file (magic {magic!r},"
                             f" dim {dim}); rebuild it")

    def forward(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.refresh()
        k = min(self.top_k, self.count)
        if k == 0:
            return (torch.empty(query.shape[0], 0), torch.empty(query.shape[0], 0,
                                                                dtype=torch.int64))
        scores, rows = (query.float() @ self.vectors.T).topk(k, dim=1)
        return scores, self.ids[rows]


def create(path: str, dim: int = 384, top_k: int = 10) -> NearestIndex:
    """An index over the vector file ``path`` (it may not exist yet: no results until then)."""
    return NearestIndex(path, dim, top_k)
