"""Every PV of a crate IOC, declared once (spec 03).

The records, the record list in ``db/`` and the screen cross-checks are all
derived from `PV_TABLE`. Each entry names a PV by a template and a *key* the
code uses to find the record; entries with a scope other than CRATE expand to
several records (per card index, per slot, per configured board).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from ioc.hardware import CARDS, BoardKind
from ioc.losses import LossReason
from ioc.packets import DIGITIZER_CHANNELS
from ioc.spectra import DEFAULT_KEV_PER_BIN, SPECTRUM_BINS

SLOTS = 7

FIFO_NUM_STATES = (
    *(f"MONFIFO {n}" for n in range(1, 7)),
    "MAIN DATA FIFO",
    "MONFIFO 8",
    *(f"CHAN {c} FIFO" for c in "ABCDEFGH"),
)
BOARD_TYPE_STATES = (
    "0?", "GRT", "GMT", "GD", "DMT", "5?", "DRT", "7?",
    "MYR", "9?", "10?", "11?", "AMD", "ASD", "14?", "15?",
)  # fmt: skip
CV_STATE_STATES = ("Stopped", "Running", "Draining", "No boards")
#: DAQC<NN>_CV_RealTime states, in `ioc.realtime.RealtimeState` order.
REALTIME_STATES = ("Off", "On", "Refused")

SIM_FAULT_STATES = (
    "None",
    "Bad marker",
    "Bad length",
    "Timestamp regression",
    "FIFO overflow",
    "FIFO underflow",
    "Read error",
)
HEADER_TYPE_STATES = ("LED", "CFD")

DIGITIZERS = frozenset({BoardKind.DIGITIZER_MASTER, BoardKind.DIGITIZER_SLAVE})
TRIGGERS = frozenset({BoardKind.TRIGGER_MASTER})
ALL_KINDS = DIGITIZERS | TRIGGERS


class Access(enum.Enum):
    """Access-security group of a record (the ASG field; rules in db/dgs.acf)."""

    DEFAULT = "DEFAULT"  # clients may write at any time: run control, selectors, sim knobs
    RUNPROTECT = "RUNPROTECT"  # crate set-up, sampled at Start; with run_protect: only at Stop
    READONLY = "READONLY"  # statistics and read-backs: never writable by clients


class Severity(enum.Enum):
    """EPICS alarm severity, as the record fields (HSV, ZSV, ...) spell it."""

    NO_ALARM = "NO_ALARM"
    MINOR = "MINOR"
    MAJOR = "MAJOR"


@dataclass(frozen=True)
class Alarm:
    """When a record's value is a state an operator must notice (Phoebus borders, alarm server).

    Thresholds follow EPICS: MINOR at value >= high or <= low, MAJOR at value >= hihi;
    ``states`` gives the severity of each enum state of a bi/mbbi. For records without
    alarm fields (waveforms) the IOC applies the thresholds to the largest element.
    """

    high: float | None = None
    hihi: float | None = None
    low: float | None = None
    states: tuple[Severity, ...] = ()


#: A count that should stay 0 (errors, losses): MINOR from 1.
ANY_COUNT = Alarm(high=1)
#: A MiB figure published at KiB resolution that should stay 0: MINOR from 1 KiB.
ANY_KIB = Alarm(high=1 / 1024)


class Scope(enum.Enum):
    """How many records one table entry stands for."""

    GLOBAL = "global"  # one per system: the run-control records
    CRATE = "crate"  # one per crate
    CARD = "card"  # one per card index 0..6 (template field {n})
    SLOT = "slot"  # one per slot-1 0..6 (template field {n})
    BOARD = "board"  # one per configured board of the given kinds ({board})
    PLACEHOLDER = "placeholder"  # the X pair for empty card indices
    SIM = "sim"  # one per configured board, sim backend only
    CHANNEL = "channel"  # one per configured board of the given kinds and channel 0..9 ({n})


@dataclass(frozen=True)
class PV:
    """One row of the PV table."""

    key: str
    template: str
    record: str
    scope: Scope
    desc: str
    enums: tuple[str, ...] = ()
    initial: float | int | str | None = None
    #: The range of values: writes outside it are refused; clients see it as LOPR..HOPR.
    low: float | None = None
    high: float | None = None
    even: bool = False
    egu: str = ""
    prec: int | None = None
    length: int = 0
    dtype: str = ""
    kinds: frozenset[BoardKind] = ALL_KINDS
    autosave: bool = False  # kept across restarts, written at once (ioc.autosave)
    access: Access | None = None  # None: DEFAULT for output records, READONLY for inputs
    alarm: Alarm | None = None

    @property
    def writable(self) -> bool:
        return self.record in ("ao", "bo", "longout", "mbbo")

    @property
    def asg(self) -> Access:
        """The access-security group the record is served with."""
        if self.access is not None:
            return self.access
        return Access.DEFAULT if self.writable else Access.READONLY

    def name(self, crate: str, n: int | None = None, board: str | None = None) -> str:
        return self.template.format(crate=crate, n=n, board=board)


def _stat(key: str, template: str, desc: str, egu: str = "", prec: int | None = None,
          **extra) -> PV:
    return PV(key, template, "ai", Scope.CRATE, desc, egu=egu, prec=prec, initial=0, **extra)


def _card(key: str, template: str, desc: str, egu: str = "", prec: int | None = None,
          **extra) -> PV:
    return PV(key, template, "ai", Scope.CARD, desc, egu=egu, prec=prec, initial=0, **extra)


ON_OFF = dict(low=0, high=1)

PV_TABLE: tuple[PV, ...] = (
    # Global run control (one place per system).
    PV("StartStop", "Online_CS_StartStop", "bo", Scope.GLOBAL, "Run control: Stop/Start",
       enums=("Stop", "Start"), initial=0, autosave=True),
    PV("SaveData", "Online_CS_SaveData", "bo", Scope.GLOBAL, "Send checked data to receivers",
       enums=("No Save", "Save"), initial=0, autosave=True),
    PV("RunNumber", "Online_CS_RunNumber", "longout", Scope.GLOBAL, "Run number",
       initial=0, low=0, high=2_147_483_647, autosave=True),
    # Per board.
    PV("CS_Ena", "VME{crate}:{board}:CS_Ena", "bo", Scope.BOARD, "Board enable (sampled at Start)",
       enums=("Disable", "Enable"), initial=0, access=Access.RUNPROTECT),
    PV("FifoNum", "VME{crate}:{board}:FifoNum", "mbbo", Scope.BOARD,
       "Trigger FIFO to read (sampled at Start)", enums=FIFO_NUM_STATES, initial=6,
       access=Access.RUNPROTECT),
    PV("PackageData", "VME{crate}:{board}:user_package_data", "longout", Scope.BOARD,
       "Board id in every packet", initial=0, low=0, high=4094, kinds=DIGITIZERS,
       access=Access.RUNPROTECT),
    PV("PackageData", "VME{crate}:{board}:USER_PACKAGE_DATA", "longout", Scope.BOARD,
       "Board id in every packet", initial=0, low=0, high=4094, kinds=TRIGGERS,
       access=Access.RUNPROTECT),
    PV("FifoPeak", "VME{crate}:{board}:FifoPeak", "ai", Scope.BOARD,
       "Highest FIFO fill seen this run", egu="%", prec=1, initial=0, low=0, high=100,
       alarm=Alarm(high=80, hihi=95)),
    PV("PlaceholderEna", "VME{crate}:X:CS_Ena", "bo", Scope.PLACEHOLDER,
       "Empty card index (always Disable)", enums=("Disable", "Enable"), initial=0, low=0, high=0,
       access=Access.RUNPROTECT),
    PV("PlaceholderFifo", "VME{crate}:X:FifoNum", "mbbo", Scope.PLACEHOLDER,
       "Empty card index (always 6)", enums=FIFO_NUM_STATES, initial=6, low=6, high=6,
       access=Access.RUNPROTECT),
    # Simulation controls (sim backend only).
    PV("SimEventRate", "VME{crate}:{board}:SIM_EventRate", "ao", Scope.SIM,
       "Simulated events/s/channel (triggers/s)", egu="Hz", prec=1, initial=0,
       low=0, high=1_000_000),
    PV("SimTraceLength", "VME{crate}:{board}:SIM_TraceLength", "longout", Scope.SIM,
       "Simulated trace samples per event", initial=0, low=0, high=992, even=True,
       kinds=DIGITIZERS),
    PV("SimHeaderType", "VME{crate}:{board}:SIM_HeaderType", "mbbo", Scope.SIM,
       "Simulated header type", enums=HEADER_TYPE_STATES, initial=0, kinds=DIGITIZERS),
    PV("SimFault", "VME{crate}:{board}:SIM_Fault", "mbbo", Scope.SIM, "Inject a fault once",
       enums=SIM_FAULT_STATES, initial=0),
    PV("SimGenerated", "VME{crate}:{board}:SIM_Generated", "ai", Scope.SIM,
       "Events accepted by the FIFO this run", initial=0),
    PV("SimDropped", "VME{crate}:{board}:SIM_Dropped", "ai", Scope.SIM,
       "Events dropped by a full FIFO this run", initial=0, alarm=ANY_COUNT),
    PV("SimCleared", "VME{crate}:{board}:SIM_Cleared", "ai", Scope.SIM,
       "Events cleared by FIFO resets this run", initial=0, alarm=ANY_COUNT),
    # Live monitoring per digitizer channel (issue 17): published at 1 Hz by ioc.monitoring.
    PV("Spectrum", "VME{crate}:{board}:Spectrum{n}", "waveform", Scope.CHANNEL,
       "Energy spectrum of channel n this run", length=SPECTRUM_BINS, dtype="int32",
       egu="counts", kinds=DIGITIZERS),
    PV("Rate", "VME{crate}:{board}:Rate{n}", "ai", Scope.CHANNEL,
       "Events/s of channel n, last second", egu="Hz", prec=1, initial=0, kinds=DIGITIZERS),
    PV("PileUp", "VME{crate}:{board}:PileUp{n}", "ai", Scope.CHANNEL,
       "Pile-up flagged events of ch. n this run", initial=0, kinds=DIGITIZERS),
    PV("CalGain", "VME{crate}:{board}:CalGain{n}", "ao", Scope.CHANNEL,
       "Calibration: keV per digitizer unit", egu="keV/unit", prec=6, initial=1.0,
       low=1e-6, high=1000.0, kinds=DIGITIZERS),
    PV("CalOffset", "VME{crate}:{board}:CalOffset{n}", "ao", Scope.CHANNEL,
       "Calibration: keV at digitizer unit 0", egu="keV", prec=3, initial=0.0,
       low=-10000.0, high=10000.0, kinds=DIGITIZERS),
    PV("SpectrumKeVPerBin", "VME{crate}:{board}:SpectrumKeVPerBin", "ao", Scope.BOARD,
       "Spectrum bin width", egu="keV", prec=3, initial=DEFAULT_KEV_PER_BIN,
       low=0.001, high=100.0, kinds=DIGITIZERS),
    PV("SpectrumReset", "VME{crate}:{board}:SpectrumReset", "bo", Scope.BOARD,
       "Zero the spectra and counts of the board", enums=("Done", "Reset"), initial=0,
       kinds=DIGITIZERS),
    # inLoop.
    _stat("CrateNum", "DAQC{crate}_CV_CRATENUM", "Crate number"),
    _stat("InLoop1", "DAQC{crate}_CV_InLoop1", "MiB read since run start", egu="MiB"),
    _stat("InLoop2", "DAQC{crate}_CV_InLoop2", "Type-F headers built since run start"),
    _stat("InLoop3", "DAQC{crate}_CV_InLoop3", "Board polls since run start"),
    _stat("InLoop4", "DAQC{crate}_CV_InLoop4", "Last transfer: bytes or error code",
          alarm=Alarm(low=-1)),
    _stat("ScanGapMax", "DAQC{crate}_CV_ScanGapMax", "Longest wait between polls of a board",
          egu="ms", prec=1, alarm=Alarm(high=20, hihi=40)),
    PV("RealTime", "DAQC{crate}_CV_RealTime", "mbbi", Scope.CRATE,
       "inLoop under the real-time policy", enums=REALTIME_STATES, initial=0,
       alarm=Alarm(states=(Severity.NO_ALARM, Severity.NO_ALARM, Severity.MINOR))),
    PV("BoardType", "DAQC{crate}_BoardType{n}", "mbbi", Scope.SLOT, "Board type in slot n+1",
       enums=BOARD_TYPE_STATES, initial=0),
    PV("InLoopRunning", "DAQC{crate}:inLoop_Running", "bi", Scope.CRATE, "inLoop running",
       enums=("Stopped", "Running"), initial=0),
    # outLoop.
    _stat("BuffersAvail", "DAQC{crate}_CV_BuffersAvail", "Buffers in qFree"),
    _stat("CvNumSendBuffers", "DAQC{crate}_CV_NumSendBuffers", "Buffers in qSender"),
    _stat("NumFreeBuffers", "DAQC{crate}_OL_NumFreeBuffers", "Buffers in qFree"),
    _stat("NumWrittenBuffers", "DAQC{crate}_OL_NumWrittenBuffers", "Buffers in qWritten"),
    _stat("NumSendBuffers", "DAQC{crate}_OL_NumSendBuffers", "Buffers in qSender"),
    _card("OutLoop", "DAQC{crate}_CV_OutLoop{n}", "Errors or first-error record (TraceBd)"),
    _card("DataRate", "DAQC{crate}_OL_DataRate{n}", "Data rate of card n", egu="kB/s", prec=1),
    _card("Data", "DAQC{crate}_OL_Data{n}", "Data from card n since run start", egu="MiB",
          prec=3),
    _stat("TotalBufsWritten", "DAQC{crate}_OL_TotalBufsWritten", "Buffers checked this run"),
    _stat("TotalFBufsWritten", "DAQC{crate}_OL_TotalFBufsWritten", "Type-F headers checked"),
    _stat("TotalBufsLost", "DAQC{crate}_OL_TotalBufsLost", "Buffers recycled unsent",
          alarm=ANY_COUNT),
    _stat("BufLostPerecnt", "DAQC{crate}_OL_BufLostPerecnt", "Lost / written", egu="%", prec=2,
          low=0, high=100, alarm=Alarm(high=1, hihi=10)),
    _stat("SendRate", "DAQC{crate}_CV_SendRate", "Rate into qSender", egu="kB/s", prec=1),
    PV("Trace", "DAQC{crate}_CV_Trace", "waveform", Scope.CRATE, "Selected trace",
       length=1024, dtype="int16"),
    PV("TraceLen", "DAQC{crate}_CV_TraceLen", "longin", Scope.CRATE, "Valid samples in Trace",
       initial=0, low=-5, high=1024),
    PV("TraceBd", "DAQC{crate}_CS_TraceBd", "longout", Scope.CRATE,
       "Card to trace (4..7: first-error rec.)", initial=0, low=0, high=15),
    PV("TraceChan", "DAQC{crate}_CS_TraceChan", "longout", Scope.CRATE, "Channel to trace",
       initial=0, low=0, high=9),
    PV("TraceHorns", "DAQC{crate}_CS_TraceHorns", "bo", Scope.CRATE, "Show trace mark bits",
       enums=("Hide", "Show"), initial=0),
    PV("HeaderCheckEnable", "DAQC{crate}_OL_HeaderCheckEnable", "ao", Scope.CRATE,
       "Walk and check digitizer buffers", initial=1, access=Access.RUNPROTECT, **ON_OFF),
    PV("TimestampCheckEnable", "DAQC{crate}_OL_TimestampCheckEnable", "ao", Scope.CRATE,
       "Check per-channel timestamp order", initial=1, access=Access.RUNPROTECT, **ON_OFF),
    PV("DeepCheckEnable", "DAQC{crate}_OL_DeepCheckEnable", "ao", Scope.CRATE,
       "Check every event (0: first 128)", initial=1, access=Access.RUNPROTECT, **ON_OFF),
    PV("HeaderSummaryEnable", "DAQC{crate}_OL_HeaderSummaryEnable", "ao", Scope.CRATE,
       "Accepted, no effect", initial=0, low=0),
    PV("HeaderSummaryPrescale", "DAQC{crate}_OL_HeaderSummaryPrescale", "ao", Scope.CRATE,
       "Accepted, no effect", initial=4096, low=0),
    PV("HeaderSummaryEventPrescale", "DAQC{crate}_OL_HeaderSummaryEventPrescale", "ao",
       Scope.CRATE, "Accepted, no effect", initial=256, low=0),
    # Sender.
    PV("SenderRunning", "DAQC{crate}_CV_SenderRunning", "bi", Scope.CRATE,
       "A receiver is being served", enums=("Stopped", "Running"), initial=0),
    # New in this product.
    PV("State", "DAQC{crate}_CV_State", "mbbi", Scope.CRATE, "Run state of this crate",
       enums=CV_STATE_STATES, initial=0,
       alarm=Alarm(states=(Severity.NO_ALARM,) * 3 + (Severity.MINOR,))),
    PV("BuffersTotal", "DAQC{crate}_CV_BuffersTotal", "longin", Scope.CRATE, "Pool size",
       initial=0),
    PV("BuffersHeld", "DAQC{crate}_CV_BuffersHeld", "longin", Scope.CRATE,
       "Buffers held by a stage", initial=0),
    PV("BuffersOK", "DAQC{crate}_CV_BuffersOK", "bi", Scope.CRATE, "Every buffer accounted for",
       enums=("Leak", "OK"), initial=1, alarm=Alarm(states=(Severity.MAJOR, Severity.NO_ALARM))),
    PV("SetupPending", "DAQC{crate}_CV_SetupPending", "bi", Scope.CRATE,
       "Set-up changed in the run: next Start", enums=("Applied", "Pending until next Start"),
       initial=0),
    _card("DataLost", "DAQC{crate}_OL_DataLost{n}", "Data of card n lost this run", egu="MiB",
          prec=3, alarm=ANY_KIB),
    _card("Errors", "DAQC{crate}_OL_Errors{n}", "Check errors of card n", alarm=ANY_COUNT),
    PV("SenderClient", "DAQC{crate}_CV_SenderClient", "stringin", Scope.CRATE,
       "Receiver being served", initial=""),
    _stat("SenderReplies", "DAQC{crate}_CV_SenderReplies", "Data replies sent this run"),
    _stat("SenderBytes", "DAQC{crate}_CV_SenderBytes", "Sent on the wire this run", egu="MiB",
          prec=3),
    _stat("SenderWireRate", "DAQC{crate}_CV_SenderWireRate", "Socket write rate", egu="kB/s",
          prec=1),
    _stat("SenderRequeued", "DAQC{crate}_CV_SenderRequeued", "Replies put back after a failure"),
    _stat("ReadErrors", "DAQC{crate}_CV_ReadErrors", "FIFO read errors this run",
          alarm=ANY_COUNT),
    PV("FirstError", "DAQC{crate}_OL_FirstError{n}", "waveform", Scope.CARD,
       "First error [code, offset, x1, x2]", length=4, dtype="float64"),
    PV("GlobalsConnected", "DAQC{crate}_CV_GlobalsConnected", "bi", Scope.CRATE,
       "Global run-control PVs reachable", enums=("Disconnected", "Connected"), initial=0,
       alarm=Alarm(states=(Severity.MAJOR, Severity.NO_ALARM))),
    _stat("SenderRejected", "DAQC{crate}_CV_SenderRejected",
          "Clients refused or cut off (protocol)"),
    _stat("Retained", "DAQC{crate}_CV_Retained", "Undelivered data kept for receivers",
          egu="MiB", prec=3),
    # Sampling service (ioc.sampling; the service itself is served by ioc.sample_pva).
    PV("SmpConsumers", "DAQC{crate}_SMP_Consumers", "longin", Scope.CRATE,
       "Sampling consumers attached", initial=0),
    _stat("SmpDelivered", "DAQC{crate}_SMP_Delivered", "Sampled events delivered"),
    _stat("SmpLost", "DAQC{crate}_SMP_Lost", "Samples lost: consumers behind"),
    PV("SmpPort", "DAQC{crate}_SMP_Port", "longin", Scope.CRATE,
       "Classic sample port (0: not served)", initial=0),
    PV("SmpPvaPort", "DAQC{crate}_SMP_PvaPort", "longin", Scope.CRATE,
       "PVA port of the sampling service", initial=0),
    *(
        PV(f"Lost{reason.value}", f"DAQC{{crate}}_OL_Lost{reason.value}", "waveform",
           Scope.CRATE, f"MiB lost per card: {reason.value}", length=7, dtype="float64",
           egu="MiB", alarm=ANY_KIB)
        for reason in LossReason
    ),
    *(
        PV(f"LostEvents{reason.value}", f"DAQC{{crate}}_OL_LostEvents{reason.value}", "waveform",
           Scope.CRATE, f"Events lost per card: {reason.value}", length=7, dtype="float64",
           alarm=ANY_COUNT)
        for reason in LossReason
    ),
)


@dataclass(frozen=True)
class BoardRef:
    """The part of a board's configuration that decides which records exist."""

    name: str
    kind: BoardKind


@dataclass(frozen=True)
class Instance:
    """One concrete record: its table row, full name and index or board."""

    pv: PV
    name: str
    index: int | None = None
    board: str | None = None


def expand(
    crate: str,
    boards: tuple[BoardRef, ...],
    *,
    with_globals: bool,
    with_crate: bool = True,
    sim: bool = True,
) -> Iterator[Instance]:
    """Every record an IOC serves, in table order."""
    for pv in PV_TABLE:
        if pv.scope is Scope.GLOBAL:
            if with_globals:
                yield Instance(pv, pv.name(crate))
            continue
        if not with_crate:
            continue
        if pv.scope in (Scope.CRATE, Scope.PLACEHOLDER):
            yield Instance(pv, pv.name(crate))
        elif pv.scope in (Scope.CARD, Scope.SLOT):
            for n in range(CARDS):
                yield Instance(pv, pv.name(crate, n=n), index=n)
        elif pv.scope is Scope.CHANNEL:
            for board in boards:
                if board.kind in pv.kinds:
                    for n in range(DIGITIZER_CHANNELS):
                        name = pv.name(crate, n=n, board=board.name)
                        yield Instance(pv, name, index=n, board=board.name)
        elif pv.scope is Scope.BOARD or (pv.scope is Scope.SIM and sim):
            for board in boards:
                if board.kind in pv.kinds:
                    yield Instance(pv, pv.name(crate, board=board.name), board=board.name)
