"""The model server, one job per module.

- ``lifecycle``: ``Server`` — loading, start/drain/stop, the pool threads' event loop, dispatch
  to the models' queues, shared-memory accounting.
- ``accept``: the listening socket's accept path and the checks on a new peer.
- ``cloop``: the compiled loop (``loop = "c"``, the default): C threads own the established
  connections' sockets, frames and replies (``python/csrc/tb_loop.c``); Python sees each
  wake-up's frames in one call.
- ``connection``: the frame dispatch both loops share (``Peer``), and the Python loop's
  framing and reply order (``Connection``, ``loop = "python"``).
- ``infer``: an INFER frame -> typed ``Request`` -> its model -> the reply.
"""

from __future__ import annotations

from .lifecycle import Server

__all__ = ["Server"]
