"""Live spectra, rates and pile-up counts of a running demo crate, as a user reads them.

One demo run (⁶⁰Co on every channel, SIM_EventRate 500 Hz) is shared by the
module; each test then looks at its own board: MDIG1 for reset, MDIG2 for the
next Start, MDIG3 for calibration. Peaks are found the way a user would: from
the Spectrum waveform and the SpectrumKeVPerBin / CalGain PVs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
from dataflow import CRATE, Pva, start_run, stop_run
from ioc_harness import IocProcess, Ports, wait_until

from ioc import screens
from ioc.monitor_screens import RATES_SCREEN, SPECTRUM_SCREEN

LINES_KEV = (1173.2, 1332.5)
CHANNELS = 10
EVENT_RATE_HZ = 500.0
RATE_SAMPLES = 4


def pv(board: str, name: str) -> str:
    return f"VME{CRATE}:{board}:{name}"


def spectrum(ioc: IocProcess, board: str, channel: int) -> np.ndarray:
    return np.asarray(ioc.pva(pv(board, f"Spectrum{channel}")), dtype=np.int64)


def peak_energies(counts: np.ndarray, kev_per_bin: float) -> list[float]:
    """The two strongest peaks above 1 MeV, as count-weighted centres of ±3 bins, in keV."""
    energies = (np.arange(counts.size) + 0.5) * kev_per_bin
    found = []
    remaining = np.where(energies > 1000.0, counts, 0)
    for _ in range(2):
        top = int(np.argmax(remaining))
        window = slice(max(top - 3, 0), top + 4)
        found.append(float(np.average(energies[window], weights=counts[window])))
        remaining[max(top - 20, 0) : top + 21] = 0
    return sorted(found)


def rate_snapshots(client: Pva, names: list[str], count: int, skip: int) -> list[list[float]]:
    """``count`` readings of the rates, each from a new publication, after ``skip`` of them."""
    readings: list[list[float]] = []
    for _ in range(skip + count):

        def new_publication(last: list[float] | None = readings[-1] if readings else None):
            values = client.numbers(*names)
            return values if values != last else None

        readings.append(wait_until(new_publication, 10, "a new rate publication"))
    return readings[skip:]


@pytest.fixture(scope="module")
def co60(tmp_path_factory) -> Iterator[tuple[IocProcess, list[list[float]]]]:
    """A demo crate after a run of a few seconds, and MDIG4's Rate0..9 read during it."""
    workdir = tmp_path_factory.mktemp("monitoring")
    ports = Ports.allocate()
    argv = ["--demo", "--data-port", str(ports.data), "--state-dir", str(workdir / "state")]
    ioc = IocProcess(argv, workdir, ports).start()
    try:
        assert ioc.getf(pv("MDIG4", "SIM_EventRate")) == EVENT_RATE_HZ
        start_run(ioc, save="No Save")
        names = [pv("MDIG4", f"Rate{n}") for n in range(CHANNELS)]
        with Pva(ioc) as client:
            # What was shown before Start, then the partial first second: not full periods.
            samples = rate_snapshots(client, names, RATE_SAMPLES, skip=2)
        stop_run(ioc)
        yield ioc, samples
    finally:
        ioc.kill()


def test_the_spectrum_of_a_co60_run_peaks_at_1173_and_1332_kev(co60):
    ioc, _ = co60
    kev_per_bin = ioc.getf(pv("MDIG1", "SpectrumKeVPerBin"))
    assert ioc.getf(pv("MDIG1", "CalGain0")) == pytest.approx(0.25)
    for channel in range(CHANNELS):
        counts = spectrum(ioc, "MDIG4", channel)
        assert counts.size == 4096 and counts.sum() > 1000
        peaks = peak_energies(counts, kev_per_bin)
        assert peaks == pytest.approx(LINES_KEV, abs=2.0), f"channel {channel}: {peaks}"


def test_rates_match_the_simulated_event_rate_within_statistics(co60):
    """Each channel's rate over the samples lies within 5 sigma of a Poisson count over
    that time. A single 1-s figure is only held within half the rate: a stall of the
    loaded test machine moves events from one second into the next, as it would on a
    busy crate PC, and the next second's figure makes up for it."""
    _, samples = co60
    assert all(len(rates) == CHANNELS for rates in samples), samples
    seconds = len(samples)
    allowed = 5 * math.sqrt(EVENT_RATE_HZ * seconds) / seconds
    for channel, rates in enumerate(zip(*samples, strict=True)):
        assert abs(sum(rates) / seconds - EVENT_RATE_HZ) <= allowed, f"Rate{channel}: {rates}"
        assert all(abs(rate - EVENT_RATE_HZ) <= EVENT_RATE_HZ / 2 for rate in rates), rates


def test_no_pile_up_is_counted_where_the_simulator_flags_none(co60):
    ioc, _ = co60
    values = ioc.caget(*(pv("MDIG4", f"PileUp{n}") for n in range(CHANNELS)))
    assert [float(v) for v in values] == [0.0] * CHANNELS


def test_rates_return_to_zero_once_stopped(co60):
    ioc, _ = co60
    for n in (0, 9):
        ioc.wait_numeric(pv("MDIG4", f"Rate{n}"), lambda rate: rate == 0, 5, f"Rate{n} == 0")


def test_a_gain_change_moves_the_peaks_of_that_channel_only(co60):
    ioc, _ = co60
    before = peak_energies(spectrum(ioc, "MDIG3", 1), 1.0)
    ioc.put_ok(pv("MDIG3", "CalGain0"), 0.3)
    try:
        moved = wait_until(
            lambda: (peaks := peak_energies(spectrum(ioc, "MDIG3", 0), 1.0))[0] > 1300 and peaks,
            10, "MDIG3 Spectrum0 rebinned with the new gain",
        )
        assert moved == pytest.approx([line * 0.3 / 0.25 for line in LINES_KEV], abs=2.5)
        assert peak_energies(spectrum(ioc, "MDIG3", 1), 1.0) == before
    finally:
        ioc.put_ok(pv("MDIG3", "CalGain0"), 0.25)


def test_bad_calibration_puts_are_refused_with_a_reason(co60):
    ioc, _ = co60
    for name, value in (("SpectrumKeVPerBin", -1), ("SpectrumKeVPerBin", 0),
                        ("CalGain2", -0.25), ("CalOffset2", "nan")):
        assert ioc.put_refused(pv("MDIG3", name), value), f"{name} = {value} accepted"
    assert ioc.getf(pv("MDIG3", "SpectrumKeVPerBin")) == 1.0
    assert ioc.getf(pv("MDIG3", "CalGain2")) == pytest.approx(0.25)
    log = ioc.log()
    assert f"refused put {pv('MDIG3', 'SpectrumKeVPerBin')} = -1" in log
    assert "below 0.001" in log


def test_spectrum_reset_zeroes_that_board_only(co60):
    ioc, _ = co60
    assert spectrum(ioc, "MDIG1", 0).sum() > 0
    ioc.put_ok(pv("MDIG1", "SpectrumReset"), "Reset")
    wait_until(
        lambda: all(spectrum(ioc, "MDIG1", n).sum() == 0 for n in range(CHANNELS)),
        10, "MDIG1 spectra zero",
    )
    assert ioc.get(pv("MDIG1", "SpectrumReset")) == "Done"
    assert spectrum(ioc, "MDIG4", 0).sum() > 0
    ioc.put_ok(pv("MDIG1", "SpectrumReset"), "Reset")  # a second reset works as the first
    wait_until(lambda: ioc.get(pv("MDIG1", "SpectrumReset")) == "Done", 5, "Done again")


def test_start_zeroes_the_spectra_of_the_previous_run(co60):
    ioc, _ = co60
    assert spectrum(ioc, "MDIG2", 0).sum() > 0
    for board in ("MDIG1", "MDIG2", "MDIG3", "MDIG4"):
        ioc.put_ok(pv(board, "SIM_EventRate"), 0)
    start_run(ioc, save="No Save")
    try:
        wait_until(
            lambda: all(spectrum(ioc, "MDIG2", n).sum() == 0 for n in range(CHANNELS)),
            10, "MDIG2 spectra zero after Start",
        )
    finally:
        stop_run(ioc)


def test_every_pv_of_the_monitoring_screens_answers(co60):
    ioc, _ = co60
    names: set[str] = set()
    for screen in (SPECTRUM_SCREEN, RATES_SCREEN):
        names |= screens.scan_screen(screens.OPI_DIR / screen,
                                     {"CRATE": CRATE, "BOARD": "MDIG2"}).pvs
    assert len(names) == 52
    assert len(ioc.caget(*(f"{name}.RTYP" for name in sorted(names)))) == len(names)


CONFIGURED = f"""
[system]
globals = "local"
[[crate]]
crate = "{CRATE}"
data_bind = "127.0.0.1"
spectrum_bins = 1024
[[crate.board]]
name = "GE1"
kind = "digitizer_master"
card = 0
slot = 3
package_data = 201
enabled = true
cal_gain = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
cal_offset = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
"""


def test_bins_and_calibration_come_from_the_configuration(start_ioc, tmp_path):
    config = tmp_path / "crate.toml"
    config.write_text(CONFIGURED)
    ioc = start_ioc("--config", str(config))
    assert ioc.caget(pv("GE1", "Spectrum0.NELM"), pv("GE1", "CalGain0")) == ["1024", "0.5"]
    ioc.put_ok(pv("GE1", "SpectrumKeVPerBin"), 3)
    start_run(ioc, save="No Save")
    try:
        wait_until(lambda: spectrum(ioc, "GE1", 5).sum() > 1500, 20, "GE1 Spectrum5 filling")
    finally:
        stop_run(ioc)
    counts = spectrum(ioc, "GE1", 5)
    assert counts.size == 1024
    assert peak_energies(counts, 3.0) == pytest.approx([2 * line for line in LINES_KEV], abs=4.0)
