"""Record fields derived from a PV table row: display limits and alarm severities.

The live records (ioc/records.py) and the record list in ``db/`` (ioc/dbfiles.py)
both take them from here, so a limit or an alarm is declared once, in the table.

Drive limits (DRVH/DRVL) are deliberately not set: EPICS clamps an out-of-range
put to them in record support, before the IOC's validator sees the value, so a
refused put (TraceBd 16, RunNumber -1) would become a silently clamped one.
Clients get the range from LOPR/HOPR instead.
"""

from __future__ import annotations

from ioc.pvs import PV, Alarm, Severity

NUMERIC_RECORDS = ("ai", "ao", "longin", "longout")
#: Severity fields of the 16 states of an mbbi/mbbo record.
MBB_SEVERITY_FIELDS = (
    "ZRSV", "ONSV", "TWSV", "THSV", "FRSV", "FVSV", "SXSV", "SVSV",
    "EISV", "NISV", "TESV", "ELSV", "TVSV", "TTSV", "FTSV", "FFSV",
)  # fmt: skip

Fields = tuple[tuple[str, str], ...]


def field_number(value: float) -> str:
    """A limit as a field value: integers without a decimal point, others exact."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def limit_fields(pv: PV) -> Fields:
    """LOPR/HOPR of a numeric record whose table row gives a whole range."""
    if pv.record not in NUMERIC_RECORDS or pv.low is None or pv.high is None:
        return ()
    return (("LOPR", field_number(pv.low)), ("HOPR", field_number(pv.high)))


def alarm_fields(pv: PV) -> Fields:
    """The alarm fields of the row's record type; () where the IOC sets severities itself."""
    alarm = pv.alarm
    if alarm is None:
        return ()
    if pv.record in ("bi", "bo"):
        return tuple(zip(("ZSV", "OSV"), (s.value for s in alarm.states), strict=True))
    if pv.record in ("mbbi", "mbbo"):
        return tuple(zip(MBB_SEVERITY_FIELDS, (s.value for s in alarm.states), strict=False))
    if pv.record not in NUMERIC_RECORDS:
        return ()
    fields: list[tuple[str, str]] = []
    if alarm.hihi is not None:
        fields += [("HIHI", field_number(alarm.hihi)), ("HHSV", Severity.MAJOR.value)]
    if alarm.high is not None:
        fields += [("HIGH", field_number(alarm.high)), ("HSV", Severity.MINOR.value)]
    if alarm.low is not None:
        fields += [("LOW", field_number(alarm.low)), ("LSV", Severity.MINOR.value)]
    return tuple(fields)


def derived_fields(pv: PV) -> Fields:
    return limit_fields(pv) + alarm_fields(pv)


def array_severity(alarm: Alarm, values) -> Severity:
    """The severity of an array record: HIGH/HIHI applied to its largest element."""
    largest = max(values, default=0)
    if alarm.hihi is not None and largest >= alarm.hihi:
        return Severity.MAJOR
    if alarm.high is not None and largest >= alarm.high:
        return Severity.MINOR
    return Severity.NO_ALARM
