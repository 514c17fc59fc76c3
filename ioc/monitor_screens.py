"""Live monitoring screens (Phoebus) of a digitizer board, generated from the PV table.

``opi/spectrum.bob`` (macros ``CRATE``, ``BOARD``): one tab per channel (a
navigation-tabs widget, the channel selector), each embedding
``spectrum_channel.bob`` with ``CH`` = the channel: the spectrum plot, its
calibration (writable) and the channel's rate and pile-up count.
``opi/rates.bob``: the rate table of the board's ten channels. The digitizer
rows of the crate screen open both.
"""

from __future__ import annotations

from xml.etree import ElementTree as ET

from ioc.packets import DIGITIZER_CHANNELS
from ioc.screens import (
    Macros,
    display,
    label,
    navigation_tabs,
    open_button,
    pv_name,
    text_entry,
    text_update,
    write_button,
    xy_plot,
)
from ioc.spectra import SPECTRUM_BINS

SPECTRUM_SCREEN = "spectrum.bob"
CHANNEL_SCREEN = "spectrum_channel.bob"
RATES_SCREEN = "rates.bob"
BOARD_MACROS: Macros = {"CRATE": "$(CRATE)", "BOARD": "$(BOARD)"}
PLOT_W, PLOT_H = 900, 460
TAB_H = 30  # the navigation tabs' default height
RATE_COLUMNS = (
    ("Channel", 10, 70),
    ("Rate (Hz)", 85, 110),
    ("Pile-up", 200, 110),
    ("Gain (keV/unit)", 315, 130),
    ("Offset (keV)", 450, 110),
    ("Spectrum", 565, 90),
)


def channel_screen() -> str:
    """One channel's spectrum: the plot by bin, the calibration and the channel's counts."""
    channel = "$(CH)"
    controls = [
        ("Rate (Hz)", text_update, pv_name("Rate", n=channel)),
        ("Pile-up", text_update, pv_name("PileUp", n=channel)),
        ("Gain (keV/unit)", text_entry, pv_name("CalGain", n=channel)),
        ("Offset (keV)", text_entry, pv_name("CalOffset", n=channel)),
    ]
    widgets: list[ET.Element] = []
    for i, (title, make, pv) in enumerate(controls):
        widgets += [label(title, 10 + 225 * i, 5, 110), make(pv, 120 + 225 * i, 5, 100)]
    widgets.append(
        xy_plot(pv_name("Spectrum", n=channel), "$(BOARD) channel $(CH)", 10, 40, PLOT_W, PLOT_H,
                x_title="Bin (energy = (bin + 0.5) x keV per bin)", x_max=SPECTRUM_BINS,
                y_title="Counts", y_max=100)
    )
    return display("$(BOARD) channel $(CH) spectrum", PLOT_W + 20, PLOT_H + 50, widgets)


def spectrum_screen() -> str:
    """A board's spectra: the board-wide bin width and reset, and one tab per channel."""
    tabs = [
        (f"Ch {n}", CHANNEL_SCREEN, {**BOARD_MACROS, "CH": str(n)})
        for n in range(DIGITIZER_CHANNELS)
    ]
    widgets = [
        label("$(BOARD) spectra, crate $(CRATE)", 10, 10, 500, 30, size=16),
        label("keV per bin", 520, 12, 90),
        text_entry(pv_name("SpectrumKeVPerBin"), 610, 12, 90),
        write_button(pv_name("SpectrumReset"), "1", "Reset spectra",
                     "Zero every spectrum and count of $(BOARD)?", 715, 10, 130, 28),
        open_button(RATES_SCREEN, BOARD_MACROS, "Rates...", 855, 10, 80, 28),
        navigation_tabs("Channels", tabs, 10, 50, PLOT_W + 30, PLOT_H + 60 + TAB_H),
    ]
    return display("$(BOARD) spectra", PLOT_W + 60, PLOT_H + 160, widgets)


def rates_screen() -> str:
    """The board's ten channels: rate, pile-up count and calibration, one row each."""
    widgets = [label("$(BOARD) channel rates, crate $(CRATE)", 10, 10, 600, 30, size=16)]
    widgets += [label(title, x, 50, w) for title, x, w in RATE_COLUMNS]
    for n in range(DIGITIZER_CHANNELS):
        y = 80 + 30 * n
        cells = (
            label(str(n), 10, y, 70),
            text_update(pv_name("Rate", n=n), 85, y, 110),
            text_update(pv_name("PileUp", n=n), 200, y, 110),
            text_entry(pv_name("CalGain", n=n), 315, y, 130),
            text_entry(pv_name("CalOffset", n=n), 450, y, 110),
        )
        widgets += [*cells, open_button(SPECTRUM_SCREEN, BOARD_MACROS, "Open...", 565, y, 90, 25)]
    return display("$(BOARD) rates", 680, 80 + 30 * DIGITIZER_CHANNELS + 20, widgets)


def monitor_screens() -> dict[str, str]:
    """File name in ``opi/`` -> contents."""
    return {
        SPECTRUM_SCREEN: spectrum_screen(),
        CHANNEL_SCREEN: channel_screen(),
        RATES_SCREEN: rates_screen(),
    }
