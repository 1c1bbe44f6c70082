"""A/B routing: weighted choice by key hash or at random, and the split's validation."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tensorbridge._routing import Route, key_point, parse_split


def test_split_is_parsed_and_checked() -> None:
    assert parse_split({"split": {"1": 90, "2": 10}}) == {1: 90, 2: 10}
    assert parse_split(None) is None
    for bad, words in (({"split": {"x": 1}}, "not a version"),
                       ({"split": {"1": -1}}, ">= 0"),
                       ({"split": {"1": 0}}, "every weight is 0"),
                       ({"split": {}}, "must map"),
                       ({"weights": {"1": 1}}, "unknown keys")):
        with pytest.raises(ValueError, match=words):
            parse_split(bad)


def test_same_key_same_version_and_keys_spread_by_weight() -> None:
    route = Route({1: "v1", 2: "v2"}, {1: 90, 2: 10})
    assert {route.pick(b"user-42") for _ in range(100)} == {route.pick(b"user-42")}
    counts = Counter(route.pick(f"user-{i}".encode()) for i in range(20000))
    assert abs(counts["v2"] / 20000 - 0.10) < 0.02, counts


def test_no_key_is_weighted_random() -> None:
    random.seed(7)
    route = Route({1: "v1", 2: "v2"}, {1: 90, 2: 10})
    counts = Counter(route.pick(None) for _ in range(20000))
    assert abs(counts["v1"] / 20000 - 0.90) < 0.02, counts


def test_unready_split_versions_are_skipped_and_no_split_means_newest() -> None:
    assert Route({1: "v1"}, {1: 50, 2: 50}).pick(b"k") == "v1"
    assert Route({1: "v1", 3: "v3"}, None).pick(b"k") == "v3"
    assert Route({1: "v1", 3: "v3"}, {2: 100}).pick(None) == "v3"  # none of the split ready
    assert Route({}, None).pick(None) is None


def test_key_point_is_stable_across_processes() -> None:
    # A fixed hash (not Python's salted hash()): restarts keep every user on their version.
    assert key_point(b"user-42") == 0.652098088363156
    assert 0 <= key_point(b"") < 1
