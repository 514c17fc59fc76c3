"""The command channel beside a crate window: calls that need an answer.

One JSON object per line each way over a Unix stream socket (abstract namespace).
A request names a board (its index in the window, -1 for the crate), an operation
and its arguments; the answer carries the result or the error's kind and message,
so KeyError and ValueError reach the caller as they would in process.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

from ioc.hardware import ReadError
from sim.window import socket_address

#: Errors that cross the channel as themselves; any other becomes a RuntimeError.
ERRORS: dict[str, type[Exception]] = {
    "KeyError": KeyError,
    "ValueError": ValueError,
    "ReadError": ReadError,
}


class PeerLost(Exception):
    """The crate process did not answer (gone, or slower than the timeout)."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def error_reply(err: Exception) -> dict[str, Any]:
    kind = type(err).__name__ if type(err).__name__ in ERRORS else "RuntimeError"
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return {"error": kind, "message": message}


class CommandLink:
    """A client connection; calls from several threads are serialised."""

    def __init__(self, window_name: str, timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(socket_address(window_name))
        except OSError as err:
            self._sock.close()
            raise PeerLost(f"no crate process answers on window {window_name}: {err}") from err
        self._reader = self._sock.makefile("rb")

    def call(self, board: int, op: str, *args: Any) -> Any:
        """The result of ``op`` on ``board``; PeerLost if the answer does not come in time."""
        request = encode({"board": board, "op": op, "args": list(args)})
        with self._lock:
            try:
                self._sock.sendall(request)
                line = self._reader.readline()
            except OSError as err:  # socket.timeout included
                raise PeerLost(f"{op}: {err or 'no answer in time'}") from err
        if not line:
            raise PeerLost(f"{op}: the crate process closed the channel")
        reply = json.loads(line)
        if "error" in reply:
            raise ERRORS.get(reply["error"], RuntimeError)(reply["message"])
        return reply.get("result")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()
