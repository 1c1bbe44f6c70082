"""The model server, one job per module.

- ``lifecycle``: ``Server`` — loading, start/drain/stop, the pool threads' event loop, dispatch
  to the models' queues, shared-memory accounting.
- ``accept``: the listening socket's accept path and the checks on a new peer.
- ``connection``: one client's framing, frame dispatch and reply order.
- ``infer``: an INFER frame -> typed ``Request`` -> its model -> the reply.
"""

from __future__ import annotations

from .lifecycle import Server

__all__ = ["Server"]
