"""What a v2 receiver is told besides its data (spec 05, docs/protocol.md): the answer
to its hello, the run information a greeting or a refusal carries, and the "no data"
reply, all from what the delivery holds at that moment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ioc import protocol
from ioc.delivery import Delivery


class ReplyLimit(Protocol):
    #: Read at each message: the largest reply the crate sends.
    max_reply_bytes: int


class V2Messages:
    """The v2 control messages of one crate's data port."""

    def __init__(
        self,
        delivery: Delivery,
        config: ReplyLimit,
        *,
        crate: int,
        run_status: Callable[[], tuple[int, bool]],
    ) -> None:
        self._delivery = delivery
        self._config = config
        self._crate = crate
        #: The crate's `_CV_State` and whether the run is complete, as v2 clients are told.
        self._run_status = run_status

    def refusal_for(self, hello: protocol.Hello) -> tuple[protocol.Refusal, str] | None:
        """Why a client with this hello cannot be served (a version not served, a run the
        crate does not hold), or None."""
        if hello.version != protocol.VERSION:
            return protocol.Refusal.BAD_HELLO, f"protocol version {hello.version} not served"
        self._delivery.catch_up()
        run = self._delivery.run
        wanted = hello.run == protocol.NO_RUN or hello.run == run.number
        same_start = hello.run_start_ns in (0, run.start_ns)
        if run.number == protocol.NO_RUN or not wanted or not same_start:
            held = "no run" if run.number == protocol.NO_RUN else f"run {run.number}"
            if wanted and not same_start:
                held += " (started again since)"
            return protocol.Refusal.WRONG_RUN, f"this crate holds data of {held}"
        return None

    def greeting(self, previous_client: str) -> bytes:
        """The hello's answer; it names the client served before."""
        return self._header(protocol.HELLO_REPLY, self._run_info(previous_client))

    def refusal(self, reason: protocol.Refusal, text: str) -> bytes:
        return self._header(protocol.REFUSED, self._run_info(text), status=int(reason))

    def no_data(self) -> bytes:
        """The reply to a request when nothing waits: the crate's state, and whether the
        run is complete (everything of it delivered)."""
        state, complete = self._run_status()
        return self._header(protocol.INSUFF_DATA,
                            status=state | (protocol.COMPLETE if complete else 0))

    def _run_info(self, text: str = "") -> bytes:
        run = self._delivery.run
        state, complete = self._run_status()
        info = protocol.RunInfo(
            crate=self._crate,
            run=run.number,
            run_start_ns=run.start_ns,
            state=state,
            complete=complete,
            max_reply=self._config.max_reply_bytes,
            boards=run.boards,
        )
        return info.pack() + text.encode()

    def _header(self, kind: int, payload: bytes = b"", status: int = 0) -> bytes:
        delivery = self._delivery
        header = protocol.V2Header(kind, len(payload), status, delivery.run.number,
                                   delivery.sent, delivery.acked)
        return header.pack() + payload
