"""How the end of a run is judged and told (`Operator.end_run`): the result and
message the run log keeps, and the operator's last line.

The judgement is a precedence: a forced end (something did not answer) outranks
a timeout (a crate not drained, receivers stopped at their timeout), which
outranks receivers that failed, which outranks data lost; only a run with none
of these is OK.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from runctl.losses import MIB, Loss
from runctl.runlog import RESULT_ERROR, RESULT_FORCED, RESULT_LOST, RESULT_OK, RESULT_TIMEOUT
from runctl.runstate import DONE, ERROR, LOST, TIMEOUT, Progress

ELSEWHERE_NOTE = (
    "started elsewhere (another operator host, or by hand): its start time and receivers "
    "are not known here"
)


def listed(reasons: Mapping[str, str]) -> str:
    """``crate NN: why; …`` of crates and their reasons."""
    return "; ".join(f"crate {crate}: {reason}" for crate, reason in reasons.items())


@dataclass(frozen=True)
class RunEnd:
    """What ending a run found."""

    run: int
    crates: int
    drain_s: float
    receivers_s: float
    #: Crates not drained within ``drain_s``, with why.
    not_drained: Mapping[str, str]
    #: Crates whose receivers were stopped at ``receivers_s``.
    late: Collection[str]
    #: Each receiver's exit code, by crate.
    exits: Mapping[str, int]
    #: Bytes each crate sent this run.
    sent: Mapping[str, int]
    losses: Mapping[str, Loss]
    #: Who did not answer when the end was forced ("globals", "crate NN"), with why.
    gone: Mapping[str, str]
    #: Crates that refused the Start and stayed Stopped with no receiver connected.
    never_ran: Collection[str]
    #: The run was started elsewhere and this host took it over to end it.
    adopted: bool

    @property
    def problem(self) -> str:
        if self.not_drained:
            return f"not drained within {self.drain_s:g} s: {listed(self.not_drained)}"
        if self.late:
            return (
                f"receivers still running after {self.receivers_s:g} s were stopped: "
                + ", ".join(f"crate {crate}" for crate in sorted(self.late))
            )
        return ""

    @property
    def failed(self) -> list[str]:
        """Receivers that exited with an error, as ``crate NN (code)``."""
        return [f"crate {crate} ({code})" for crate, code in self.exits.items() if code != 0]

    @property
    def result(self) -> str:
        if self.gone:
            return RESULT_FORCED
        if self.problem:
            return RESULT_TIMEOUT
        if self.failed:
            return RESULT_ERROR
        if any(self.losses.values()):
            return RESULT_LOST
        return RESULT_OK

    @property
    def _forced(self) -> str:
        return "did not answer: " + "; ".join(f"{who}: {why}" for who, why in self.gone.items())

    @property
    def message(self) -> str:
        """The run log's message: everything out of the ordinary, in one line."""
        never_ran = ", ".join(f"crate {crate}" for crate in sorted(self.never_ran))
        parts = (
            self._forced if self.gone else "",
            self.problem,
            f"never ran: {never_ran}" if never_ran else "",
            ELSEWHERE_NOTE if self.adopted else "",
        )
        return "; ".join(part for part in parts if part)

    def closing(self, duration_s: float | None) -> Progress:
        """The operator's last line, once the run is logged and the state is STOP."""
        ended = f"run {self.run} ended" + (
            f" after {duration_s:.1f} s" if duration_s is not None else ""
        )
        if self.gone:
            return Progress(
                DONE,
                f"STOP: {ended} by force ({self._forced}); receivers stopped, logged as forced",
            )
        if self.problem:
            return Progress(TIMEOUT, f"{self.problem}; run {self.run} logged, STOP")
        if self.failed:
            return Progress(
                ERROR, f"receivers failed: {', '.join(self.failed)}; run {self.run} logged, STOP"
            )
        total = sum(self.sent.values()) / MIB
        summary = f"STOP: {ended}, {self.crates} crate(s), {total:.1f} MiB sent"
        if self.result == RESULT_LOST:
            lost = ", ".join(
                f"crate {crate}: {loss.describe()}" for crate, loss in self.losses.items() if loss
            )
            return Progress(LOST, f"{summary}; DATA LOST: {lost}")
        return Progress(DONE, summary)
