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


def test_split_on_a_real_server(make_server, tmp_path) -> None:
    """10,000 calls without a key land 90/10 (within 2 points); 1,000 with one key on one
    version; a pinned version ignores the split; metrics count each version."""
    import torch
    from repo_fixtures import (
        LINEAR_CONFIG,
        free_port,
        metrics_text,
        write_config,
        write_version,
    )

    from tensorbridge import Client

    repo = tmp_path / "repo"
    write_config(repo, "linear", LINEAR_CONFIG + 'version_policy = "all"\n'
                 '[routing]\nsplit = { "1" = 90, "2" = 10 }\n')
    write_version(repo, "linear", 1, 2.0, 1.0)
    write_version(repo, "linear", 2, 3.0, 0.0)
    port = free_port()
    srv = make_server(["echo=tensorbridge.models.testing:echo"],
                      ["--repository", str(repo), "--warmup", "0", "--metrics-port", str(port)])
    x = {"x": torch.tensor([[5.0]])}
    answers = {1: 11.0, 2: 15.0}
    with Client(srv.socket, timeout=5) as client:

        def call(**kwargs) -> int:
            y = client.infer("linear", x, **kwargs)["y"].item()
            assert y == answers[client.last_version]  # the version named is the one that ran
            return client.last_version

        unkeyed = Counter(call() for _ in range(10_000))
        keyed = Counter(call(routing_key="user-42") for _ in range(1_000))
        pinned = Counter(call(version=2, routing_key="user-42") for _ in range(100))
        (listed,) = client.admin("list", "linear")
    share = unkeyed[1] / 10_000
    print(f"split 90/10: version 1 got {share:.2%} of 10,000 unkeyed calls")
    assert abs(share - 0.90) <= 0.02, unkeyed
    assert len(keyed) == 1 and sum(keyed.values()) == 1_000, keyed
    assert pinned == {2: 100}
    assert listed["routing"] == {"1": 90, "2": 10}
    text = metrics_text(port)
    for version, count in (unkeyed + keyed + pinned).items():
        assert (f'tensorbridge_model_version_requests_total{{model="linear",status="ok",'
                f'version="{version}"}} {float(count)}') in text
    assert 'tensorbridge_model_version_ready{model="linear",version="2"} 1.0' in text
