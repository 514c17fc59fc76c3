"""Plot the energy spectrum and the hit multiplicity of an event file (dgs-merge --events).

    python examples/spectrum.py EVENTS.root|EVENTS.h5 [-o spectrum.png]

Reads the per-hit energy (``ekev`` when the file was written with a
calibration, else ``e`` in ADC counts) and the multiplicity of every event,
from ROOT with uproot or from HDF5 with h5py, and saves a PNG with both
histograms. With a ⁶⁰Co source the two lines at 1173.2 and 1332.5 keV are marked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

CO60_LINES_KEV = (1173.228, 1332.492)


def read_events(path: Path) -> tuple[np.ndarray, np.ndarray, bool, dict]:
    """(energy per hit, multiplicity per event, energy in keV?, metadata) of one event file."""
    if path.suffix.lower() in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path) as h5:
            hits = h5["hits"][:]
            multiplicity = h5["events"]["mult"]
            metadata = json.loads(h5.attrs["metadata"])
        calibrated = "energy_kev" in hits.dtype.names
        return hits["energy_kev" if calibrated else "energy"], multiplicity, calibrated, metadata
    import uproot

    with uproot.open(path) as root:
        tree = root["events"]
        calibrated = bool(tree.keys(filter_name="ekev"))
        arrays = tree.arrays([("ekev" if calibrated else "e"), "mult"], library="np")
        metadata = json.loads(str(root["metadata"]))
    energy = np.concatenate(arrays["ekev" if calibrated else "e"]) if arrays["mult"].size else []
    return np.asarray(energy), arrays["mult"], calibrated, metadata


def plot(path: Path, output: Path) -> Path:
    energy, multiplicity, calibrated, metadata = read_events(path)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2),
                                         gridspec_kw={"width_ratios": [3, 1]})
    upper = 1500.0 if calibrated else float(np.percentile(energy, 99.9)) * 1.1
    left.hist(energy, bins=1500, range=(0, upper), histtype="step", color="tab:blue")
    left.set_yscale("log")
    left.set_xlabel("energy (keV)" if calibrated else "energy (ADC counts)")
    left.set_ylabel("hits per bin")
    if calibrated:
        for line in CO60_LINES_KEV:
            left.axvline(line, color="tab:red", lw=0.8, ls=":")
            left.annotate(f"{line:.1f} keV", (line, 0.97), xycoords=("data", "axes fraction"),
                          ha="right", va="top", rotation=90, fontsize=8, color="tab:red")
    runs = ", ".join(str(r) for r in (metadata.get("pvs_begin") or {}).get("runs", []))
    left.set_title(f"{len(energy)} hits in {len(multiplicity)} events"
                   + (f" — {runs}" if runs else ""))
    largest = int(multiplicity.max()) if len(multiplicity) else 1
    right.hist(multiplicity, bins=np.arange(0.5, largest + 1.5), color="tab:green")
    right.set_yscale("log")
    right.set_xlabel(f"hits per event (window {metadata.get('window_ticks', '?')} ticks)")
    right.set_ylabel("events")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", type=Path, help="an event file from dgs-merge --events")
    parser.add_argument("-o", "--output", type=Path, default=Path("spectrum.png"))
    args = parser.parse_args(argv)
    print(f"saved {plot(args.events, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
