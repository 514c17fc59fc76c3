"""The simulated boards' register maps: names, power-on values, the bit fields the simulator reads.

Facts from the original system's public register templates (goluckyryan/ANLDAQ,
``ioc/db``): every register the digitizer templates (MDig*, SDig* are the same
map) and the master-trigger templates (MTrig*) name, and the bit fields of the
few registers that shape the simulated data. Values are whole 32-bit words.

The original's user templates write most numeric fields with masks of the form
``0xAAAA_WWSS``: not a literal mask but a field ``WW`` bits wide starting at bit
``SS`` (``0xAAAA0E00``: bits 13:0; ``0xAAAA0818``: bits 31:24; ``0xAAAA2000``:
the whole register). Plain masks (``0x00008000``) are literal. The fields below
are written out as literal masks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ioc.hardware import BoardKind
from ioc.packets import DIGITIZER_CHANNELS

#: Every register value is one 32-bit word.
REGISTER_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class Field:
    """A bit field of a register: ``mask`` is literal, the value sits at its lowest set bit."""

    mask: int

    @property
    def shift(self) -> int:
        return (self.mask & -self.mask).bit_length() - 1

    def get(self, register_value: int) -> int:
        return (register_value & self.mask) >> self.shift

    def put(self, register_value: int, field_value: int) -> int:
        """``register_value`` with this field set to ``field_value`` (higher bits cut off)."""
        return (register_value & ~self.mask) | ((field_value << self.shift) & self.mask)


# Digitizer fields the simulator honours (MDigUser: channel_enableN, trigger_polarityN,
# cfd_esum_modeN, trig_ts_modeN, P2_modeN, led_thresholdN, raw_data_lengthN, cfd_mode,
# master_logic_enable, user_package_data).
CHANNEL_CONTROL = "reg_channel_control"  # + channel number
CHANNEL_ENABLE = Field(0x00000001)  # 0 "Reset", 1 "Run"
TRIGGER_POLARITY = Field(0x00000C00)  # 0 Disabled, 1 RiseEdge, 2 FallEdge, 3 Both
POLARITY_RISING_EDGE = 1
POLARITIES_SEEING_RISING_PULSES = (1, 3)  # RiseEdge, Both
CFD_ESUM_MODE = Field(0x80000000)  # 0 "LED or CFD", 1 "LED+d": header word 3 bit 22
TRIG_TS_MODE = Field(0x00000002)  # 0 "arrival", 1 "TrigMsg": header word 3 bit 21
P2_MODE = Field(0x00000010)  # 0 "Separate", 1 "Span": header word 10 bit 14
LED_THRESHOLD = "reg_led_threshold"  # + channel number
LED_THRESHOLD_ADC = Field(0x00003FFF)  # EGU "adu"
RAW_DATA_LENGTH = "reg_raw_data_length"  # + channel number
RAW_DATA_SAMPLES = Field(0x000003FF)  # ESLO 0.01 us: one count per 10 ns ADC sample
MASTER_LOGIC_STATUS = "reg_master_logic_status"
MASTER_LOGIC_ENABLE = Field(0x00000001)  # 0 "Reset", 1 "Enable"
CFD_MODE = Field(0x00008000)  # 0 "LED_Mode", 1 "CFD_Mode"
DIGITIZER_PACKAGE_DATA = "reg_user_package_data"
# Live read-only registers of a digitizer.
BOARD_ID = "regin_board_id"
LIVE_TIMESTAMP = ("regin_live_timestamp_lsb", "regin_live_timestamp_msb")
LATCHED_TIMESTAMP = ("regin_lat_timestamp_lsb", "regin_lat_timestamp_msb")
ACCEPTED_EVENT_COUNT = "regin_accepted_event_count"  # + channel number
DROPPED_EVENT_COUNT = "regin_dropped_event_count"  # + channel number

# Trigger registers the simulator honours (MTrigRegisters).
TRIGGER_PACKAGE_DATA = "reg_USER_PACKAGE_DATA"
TRIGGER_LATCHED_TIMESTAMP = ("reg_LATCHED_TS_LOW", "reg_LATCHED_TS_MID", "reg_LATCHED_TS_HIGH")

#: The board id both kinds put in packets: 12 bits of their package-data register.
PACKAGE_DATA = Field(0x00000FFF)

#: Power-on LED threshold: just below the simulated spectrum's lowest energy (25 keV).
POWER_ON_LED_THRESHOLD = 100
#: What the simulated firmware reports in its code revision and date registers.
CODE_REVISION = "regin_code_revision"
SIM_CODE_REVISION = 0x00005100
CODE_DATE = "regin_code_date"
SIM_CODE_DATE = 0x20261203


def channel_register(prefix: str, channel: int) -> str:
    return f"{prefix}{channel}"


_DIGITIZER_PER_CHANNEL = (
    "reg_channel_control", "reg_led_threshold", "reg_CFD_fraction", "reg_raw_data_delay",
    "reg_raw_data_length", "reg_d_window", "reg_k_window", "reg_m_window", "reg_d3_window",
    "reg_disc_width", "reg_p1_window", "reg_p2_window", "regin_dropped_event_count",
    "regin_accepted_event_count", "regin_ahit_count", "regin_disc_count", "regin_hihilolo_",
    "regin_hilo_",
)
_DIGITIZER_SINGLE = (
    "regin_board_id", "reg_programming_done", "reg_external_discriminator_src",
    "reg_vme_ext_delay", "regin_hardware_status", "reg_user_package_data", "reg_win_comp_min",
    "reg_win_comp_max", "reg_dac", "reg_ila_config", "reg_diag_mux_control",
    "reg_holdoff_control", "reg_baseline_delay", "reg_diag_channel_input",
    "reg_external_disc_mode", "reg_rj45_spare_dout_control", "regin_led_state",
    "reg_led_control", "reg_downsample_holdoff", "regin_lat_timestamp_lsb",
    "regin_lat_timestamp_msb", "regin_live_timestamp_lsb", "regin_live_timestamp_msb",
    "reg_veto_gate_width", "reg_master_logic_status", "reg_trigger_config",
    "regin_phase_errors", "regin_phase_value", "regin_phase_offset_a", "regin_phase_offset_b",
    "regin_phase_offset_c", "regin_serdes_phase_value", "regin_code_revision",
    "regin_code_date", "reg_ts_err_count_ctrl", "regin_ts_err_count", "reg_sd_config",
    "reg_channel_pulsed_control",
)

#: The VME-interface FPGA's registers (the original's ...RegistersVME/UserVME templates):
#: clock selection (``clk_select``), power and temperature monitors, serial number.
VME_CLOCK_CONTROL = "vme_clk_ctrl"
VME_MONITOR_STATUS = "VME_MON_STATUS"
VME_SERIAL_NUMBER = "SERIAL_NUMBER"
_DIGITIZER_VME_FPGA = ("vme_gp_ctrl", VME_CLOCK_CONTROL, VME_MONITOR_STATUS, VME_SERIAL_NUMBER)
#: Power-on monitors: power, under/over-voltage and the three temperature sensors all OK.
MONITORS_OK = 0x3F

#: Every digitizer register, master and slave alike (222).
DIGITIZER_REGISTERS = frozenset(
    _DIGITIZER_SINGLE
    + _DIGITIZER_VME_FPGA
    + tuple(channel_register(p, c) for p in _DIGITIZER_PER_CHANNEL
            for c in range(DIGITIZER_CHANNELS))
)

_TRIGGER_SINGLE_NAMES = (
    "AUX_INPUT_STATE AUX_IO_CTL CHAN_FIFO_CTL CHAN_FIFO_STATE CODE_DATE CODE_REVISION "
    "COINC_OVERLAP_CONTROL COINC_TRIG_MASK CONN_A_DATA CONN_B_DATA CONN_C_DATA CONN_D_DATA "
    "CPLD_EXTRA CPLD_MASK CPLD_MULT DEN_BUS DIAG_PIN_CTL ENCODER_SOURCE_SELECT ENCODER_TEST "
    "FIFO_RESETS FRAME_12_CMD_CNT FRAME_14_CMD_CNT FRAME_16_CMD_CNT FRAME_17_CMD_CNT "
    "FS_MULT_THRESH FS_SOURCE INPUT_LINK_MASK LATCHED_TS_HIGH LATCHED_TS_LOW LATCHED_TS_MID LED "
    "LINK_LRU_CTL LINK_LRU_MACH_STAT LINK_L_PROPAGATION_CONTROL LINK_R_PROPAGATION_CONTROL "
    "LINK_U_PROPAGATION_CONTROL LOCAL_TRIG_DELAY_L LOCAL_TRIG_DELAY_R LOCAL_TRIG_DELAY_U "
    "LOCK_BUS LVDS_PREEMPHASIS MASTER_COUNTER_RESETS MASTER_FIFO_RESETS MISC_CLK_CTL "
    "MISC_CTL1 MISC_CTL2 MISC_STAT MISC_STAT2 MON2_FIFO_SEL MON3_FIFO_SEL MON4_FIFO_SEL "
    "MON5_FIFO_SEL MON6_FIFO_SEL MON7_FIFO_DEPTH MON7_FIFO_SEL MON7_FIFO_STATE MON7_FILL_CTL "
    "MON8_FIFO_SEL MON_FIFO_STATE MSTR_MACH_STATE MYRIAD_OVERLAP_CTL MYRIAD_TRIG_DELAY "
    "NIM1_DELAY NIM2_DELAY OTHER_FIFO_STATE PULSED_CTL1 PULSED_CTL2 RATE_COUNTER_CTL "
    "REMOTE_MULTIPLCITY_CONTROL REMOTE_TRIGGER_PLANE_THRESHOLD REN_BUS SERDES_LINE_LE "
    "SERDES_LOCAL_LE SERDES_RPOWER SERDES_TPOWER SSI_CTL SSI_ENCODE_TIME STARTING_TIMESTAMP_HI "
    "STARTING_TIMESTAMP_LOW STARTING_TIMESTAMP_MID SUM_CONN_BUF_MON SUM_OF_X_THRESH "
    "SUM_OF_Y_THRESH SYNC_BUS SYSTEM_THROTTLE_MAP TARGET_WHEEL_AUX_CTL TDC_TRIG_SEL "
    "TIMESTAMP_A TIMESTAMP_B TIMESTAMP_C TRIGGER_WIDTH TRIG_ALGO_MUX_SEL TRIG_MASK UNUSED_2C8 "
    "UNUSED_2CC USER_PACKAGE_DATA X_PLANE_LINK_MASK Y_PLANE_LINK_MASK DiagnosticA DiagnosticB "
    "DiagnosticC DiagnosticD DiagnosticE DiagnosticF DiagnosticG DiagnosticH FRAME_17_DATA_1 "
    "FRAME_17_DATA_2 FRAME_17_DATA_3 FRAME_17_DATA_4 FRAME_17_DATA_5 code_date_VME fpga_status "
    "fpga_version full_code_revision"
)
_TRIGGER_FAMILIES = (
    [f"{ram}_RAM_{row}{column}" for ram in ("SWEEP", "TRIG", "VETO")
     for row in "ABCDEFGHIJKLMNOP" for column in "ABCD"]
    + [f"{kind}_{side}" for kind in ("REMOTE_TRIGGER_TS_OFFSET", "REMOTE_TRIG_DELAY",
                                     "REMOTE_TRIG_DIG_OFFSET", "REMOTE_TRIG_OVERLAP_CTL")
       for side in "LRU"]
    + [f"{kind}_RATE_COUNTER_{n}_{half}" for kind in ("RAW_TRIG", "TRIG")
       for n in range(1, 9) for half in ("HIGH", "LOW")]
    + [f"{kind}_{letter}" for kind in ("TRIGGER_PRESCALE", "TRIG_VETO_SELECT")
       for letter in "ABCDEFGH"]
)

#: Every master-trigger register (367).
TRIGGER_REGISTERS = frozenset(
    f"reg_{name}" for name in _TRIGGER_SINGLE_NAMES.split() + _TRIGGER_FAMILIES
)


def register_names(kind: BoardKind) -> frozenset[str]:
    return TRIGGER_REGISTERS if kind.is_trigger else DIGITIZER_REGISTERS


def is_read_only(register: str) -> bool:
    """``regin_*`` registers (and the VME FPGA's monitors) report board state; writing
    them has no meaning."""
    return register.startswith("regin_") or register in (VME_MONITOR_STATUS, VME_SERIAL_NUMBER)


def power_on(kind: BoardKind, package_data: int, trace_samples: int = 0,
             cfd: bool = False) -> dict[str, int]:
    """Register values of a freshly configured board (the configuration's sim settings).

    Channels start enabled, triggering on the rising edge, with the LED threshold just
    below the simulated spectrum; everything not listed here powers on as 0.
    """
    values = dict.fromkeys(register_names(kind), 0)
    if kind.is_trigger:
        values[TRIGGER_PACKAGE_DATA] = package_data
        return values
    values[DIGITIZER_PACKAGE_DATA] = package_data
    values[MASTER_LOGIC_STATUS] = CFD_MODE.put(0, int(cfd))
    values[CODE_REVISION] = SIM_CODE_REVISION
    values[CODE_DATE] = SIM_CODE_DATE
    values[VME_MONITOR_STATUS] = MONITORS_OK
    values[VME_SERIAL_NUMBER] = SIM_CODE_REVISION << 16
    control = TRIGGER_POLARITY.put(CHANNEL_ENABLE.put(0, 1), POLARITY_RISING_EDGE)
    for channel in range(DIGITIZER_CHANNELS):
        values[channel_register(CHANNEL_CONTROL, channel)] = control
        values[channel_register(LED_THRESHOLD, channel)] = POWER_ON_LED_THRESHOLD
        values[channel_register(RAW_DATA_LENGTH, channel)] = trace_samples
    return values

