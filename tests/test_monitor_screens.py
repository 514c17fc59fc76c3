"""opi/spectrum.bob, spectrum_channel.bob and rates.bob: opened from every digitizer row of
the crate screen, and naming only records of that board (checked against the PV table)."""

from __future__ import annotations

import pytest

from ioc import screens
from ioc.dbfiles import board_refs
from ioc.monitor_screens import RATES_SCREEN, SPECTRUM_SCREEN
from ioc.pvs import DIGITIZERS, expand

SYSTEMS = screens.example_systems()
CHANNELS = range(10)


@pytest.mark.parametrize("system_file", sorted(SYSTEMS))
def test_every_digitizer_row_opens_its_spectra_and_rates_naming_only_its_records(system_file):
    for crate in SYSTEMS[system_file].crates:
        crate_scan = screens.scan_screen(screens.OPI_DIR / "crate.bob", screens.crate_macros(crate))
        opened = {(path.name, macros.get("BOARD")): macros for path, macros in crate_scan.opens}
        records = {i.name for i in expand(crate.crate, board_refs(crate), with_globals=True)}
        for board in crate.boards:
            prefix = f"VME{crate.crate}:{board.name}:"
            for screen in (SPECTRUM_SCREEN, RATES_SCREEN):
                macros = opened.get((screen, board.name))
                if board.kind not in DIGITIZERS:
                    assert macros is None, f"{board.name} (trigger) opens {screen}"
                    continue
                assert macros == {"CRATE": crate.crate, "BOARD": board.name}
                scan = screens.scan_screen(screens.OPI_DIR / screen, macros)
                assert scan.unresolved == set()
                assert scan.pvs - records == set()
                assert {f"{prefix}Rate{n}" for n in CHANNELS} <= scan.pvs
                assert {f"{prefix}CalGain{n}" for n in CHANNELS} <= scan.pvs
            spectra = screens.scan_screen(screens.OPI_DIR / SPECTRUM_SCREEN,
                                          {"CRATE": crate.crate, "BOARD": board.name})
            if board.kind in DIGITIZERS:
                assert {f"{prefix}Spectrum{n}" for n in CHANNELS} <= spectra.pvs
                assert {f"{prefix}SpectrumKeVPerBin", f"{prefix}SpectrumReset"} <= spectra.pvs


def test_the_channel_selector_embeds_one_display_per_channel():
    scan = screens.scan_screen(screens.OPI_DIR / SPECTRUM_SCREEN, {"CRATE": "01", "BOARD": "B"})
    plotted = sorted(name for name in scan.pvs if ":Spectrum" in name and name[-1].isdigit())
    assert plotted == [f"VME01:B:Spectrum{n}" for n in CHANNELS]
    assert {path.name for path in scan.files} == {SPECTRUM_SCREEN, "spectrum_channel.bob"}
