"""The server-wide shared-memory cap: past it, clients get OVERLOADED instead of growth."""

from __future__ import annotations

import pytest
import torch

import tensorbridge as tb


def test_regions_past_the_shm_cap_are_refused_until_memory_is_freed(make_server,
                                                                      leak_check) -> None:
    srv = make_server(models=["echo=tensorbridge.models.testing:echo"],
                      extra=["--shm-cap-mb", "3"])
    x = torch.arange(8, dtype=torch.float32)
    clients = [tb.Client(srv.socket) for _ in range(4)]
    try:
        for c in clients[:3]:  # 1 MiB region each: 3 MiB, the cap
            assert torch.equal(c.infer("echo", {"x": x})["x"], x)
        with pytest.raises(tb.OverloadedError, match="shm_cap_mb"):
            clients[3].infer("echo", {"x": x})
        # Growing a region past the cap is refused too, and the old region keeps working.
        with pytest.raises(tb.OverloadedError, match="shared-memory cap"):
            clients[0].infer("echo", {"x": torch.zeros(1 << 20)})
        assert torch.equal(clients[0].infer("echo", {"x": x})["x"], x)
        clients[1].close()  # frees 1 MiB once the server has seen the hang-up
        with tb.Client(srv.socket) as probe:  # PING needs no region
            while probe.ping()["connections_open"] > 4:  # clients 0, 2, 3 and the probe
                pass
        again = tb.Client(srv.socket)
        assert torch.equal(again.infer("echo", {"x": x})["x"], x)
        again.close()
    finally:
        for c in clients:
            c.close()
