"""Version routing (A/B): which ready version a request without a pinned version runs on.

With a split (``[models.NAME.routing] split = {"1" = 90, "2" = 10}``) a version is chosen by
weight among the split's ready versions: by a hash of the routing key when the request has
one (the same key reaches the same version as long as the split and the ready versions are
unchanged), else at random. Without a split, or when none of its versions is ready, the
newest ready version serves.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def parse_split(routing: dict[str, Any] | None) -> dict[int, float] | None:
    """``{"split": {"1": 90, "2": 10}}`` -> ``{1: 90, 2: 10}``; None without a split."""
    if not routing:
        return None
    unknown = set(routing) - {"split"}
    if unknown:
        raise ValueError(f"routing has unknown keys {sorted(unknown)}; use split = "
                         "{\"1\" = 90, \"2\" = 10}")
    split = routing.get("split")
    if not isinstance(split, dict) or not split:
        raise ValueError(f"routing split must map versions to weights, like "
                         f"{{\"1\" = 90, \"2\" = 10}}, not {split!r}")
    out: dict[int, float] = {}
    for version, weight in split.items():
        if not str(version).isdigit() or int(version) < 1:
            raise ValueError(f"routing split: {version!r} is not a version number (1, 2, ...)")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise ValueError(f"routing split: the weight of version {version} must be a "
                             f"number >= 0, not {weight!r}")
        out[int(version)] = weight
    if not any(out.values()):
        raise ValueError("routing split: every weight is 0")
    return out


def key_point(key: bytes) -> float:
    """A routing key's fixed place in [0, 1): the same key always lands on the same point."""
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


class Route(Generic[T]):
    """An immutable snapshot of a model's ready versions and how to pick among them.

    The registry replaces a model's route as a whole; a request reads it once, so it sees
    either the old or the new set of versions, never a mix.
    """

    __slots__ = ("by_version", "newest", "_versions", "_bounds", "_total")

    def __init__(self, ready: dict[int, T], split: dict[int, float] | None) -> None:
        self.by_version = dict(ready)
        self.newest = ready[max(ready)] if ready else None
        weighted = sorted((v, w) for v, w in (split or {}).items() if w > 0 and v in ready)
        self._versions = [ready[v] for v, _ in weighted]
        bounds, total = [], 0.0
        for _, weight in weighted:
            total += weight
            bounds.append(total)
        self._bounds = bounds
        self._total = total

    def pick(self, key: bytes | None) -> T | None:
        """The version for one request: by the key's hash, at random, or the newest."""
        if not self._versions:
            return self.newest
        point = key_point(key) if key is not None else random.random()
        i = bisect.bisect_right(self._bounds, point * self._total)
        return self._versions[min(i, len(self._versions) - 1)]
