"""The register-map extractor (tools/extract_registermap.py) on small made-up databases."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "extract_registermap.py"
_spec = importlib.util.spec_from_file_location("extract_registermap", TOOL)
extract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(extract)

DATABASE = """
# record(bo, "commented:out") {}
record(ao, "VME$(CRATE):$(BOARD):gain") {
    field(DTYP, "Raw Soft Channel")   field(EGU, "adu")  # units
    field(OUT, "VME$(CRATE):$(BOARD):gainLONGOUT PP NMS")
}
record(longout, "VME$(CRATE):$(BOARD):gainLONGOUT") {
    field(OUT, "@asynMask($(BOARD),0,0xaaaa0818,1)reg_gain")
}
record(mbbi, "VME$(CRATE):$(BOARD):mode _RBV") {
    field(ZRST, "A") field(ZRVL, "0") field(ONST, "B") field(ONVL, "5")
    field(INP, "@asynMask($(BOARD),0,0x38000000,1)reg_mode")
}
record(dfanout, "VME01:GLBL:gain") {
    field(OUTA, "VME01:MDIG1:gain.VAL PP NMS")
    field(DOL, "0")
}
"""


def test_bit_fields_of_plain_and_width_shift_masks():
    assert extract.bit_field("0xaaaa0818") == (0xFF00_0000, 24)
    assert extract.bit_field("0xaaaa2000") == (0xFFFF_FFFF, 0)
    assert extract.bit_field("0x38000000") == (0x3800_0000, 27)


def test_records_keep_facts_bindings_and_structured_links():
    records = {r["name"]: r for r in extract.records_of(DATABASE, None)}
    assert "commented:out" not in records
    gain = records["VME{crate}:{board}:gain"]
    assert gain["raw"] and gain["fields"] == {"EGU": "adu"}
    assert gain["links"]["OUT"] == {"record": "VME{crate}:{board}:gainLONGOUT", "flags": "PP NMS"}
    assert records["VME{crate}:{board}:gainLONGOUT"]["register"] == {
        "name": "reg_gain", "mask": 0xFF00_0000, "shift": 24, "write": True,
    }
    mode = records["VME{crate}:{board}:mode_RBV"]  # EPICS 7 refuses the blank
    assert mode["register"]["write"] is False and mode["fields"]["ONVL"] == "5"


def test_a_crate_database_is_generalised_over_the_crate_number():
    records = {r["name"]: r for r in extract.records_of(DATABASE, "01")}
    fan_out = records["VME{crate}:GLBL:gain"]
    assert fan_out["links"]["OUTA"] == {
        "record": "VME{crate}:MDIG1:gain", "field": "VAL", "flags": "PP NMS",
    }
    assert fan_out["fields"] == {"DOL": "0"}
