"""CC control: value mappings, edges for buttons and pedals, channel filtering, DAW panics."""

from __future__ import annotations

import pytest

from antiphon.daemon.config import JamConfig
from antiphon.daemon.controls import (
    ENABLE,
    END_CALL,
    PANIC,
    SET_ANSWER_SCALE,
    SET_TEMPERATURE,
    Action,
    ControlConfigError,
    Controls,
    cc_to_answer_scale,
    cc_to_temperature,
)

CC1 = 0xB0  # control change on channel 1
CC2 = 0xB1


def test_knobs_map_onto_their_ranges_geometrically():
    c = Controls()
    assert c.handle([CC1, 21, 0], 1.0) == Action(SET_TEMPERATURE, pytest.approx(0.2), 1.0)
    assert c.handle([CC1, 21, 127], 2.0).value == pytest.approx(2.0)
    assert c.handle([CC1, 21, 89], 3.0).value == pytest.approx(1.0, abs=0.01)
    assert c.temperature == pytest.approx(1.0, abs=0.01)
    assert c.handle([CC1, 22, 0], 4.0) == Action(SET_ANSWER_SCALE, pytest.approx(0.25), 4.0)
    assert c.handle([CC1, 22, 127], 5.0).value == pytest.approx(4.0)
    assert c.handle([CC1, 22, 64], 6.0).value == pytest.approx(1.0, abs=0.03)
    # equal knob travel, equal ratio
    assert cc_to_temperature(40) / cc_to_temperature(20) == pytest.approx(cc_to_temperature(120) / cc_to_temperature(100))
    assert cc_to_answer_scale(-5) == 0.25 and cc_to_answer_scale(500) == 4.0


def test_repeated_knob_value_is_not_a_new_action():
    c = Controls()
    assert c.handle([CC1, 21, 50], 1.0) is not None
    assert c.handle([CC1, 21, 50], 1.1) is None
    assert c.handle([CC1, 21, 51], 1.2) is not None


def test_enable_switch_reports_changes_only():
    c = Controls()
    assert c.enabled
    assert c.handle([CC1, 23, 127], 1.0) is None  # already on
    assert c.handle([CC1, 23, 0], 2.0) == Action(ENABLE, 0.0, 2.0)
    assert not c.enabled
    assert c.handle([CC1, 23, 10], 2.5) is None
    assert c.handle([CC1, 23, 64], 3.0) == Action(ENABLE, 1.0, 3.0)
    assert c.handle([CC1, 23, 63], 4.0).describe() == "answering off"


def test_end_call_and_panic_fire_on_the_press_only():
    c = Controls()
    assert c.handle([CC1, 24, 127], 1.0) == Action(END_CALL, 24.0, 1.0)
    assert c.handle([CC1, 24, 127], 1.1) is None  # held
    assert c.handle([CC1, 24, 90], 1.2) is None  # half-pedal wobble while held
    assert c.handle([CC1, 24, 0], 1.3) is None  # release
    assert c.handle([CC1, 24, 100], 1.4) == Action(END_CALL, 24.0, 1.4)
    assert c.handle([CC1, 25, 127], 2.0) == Action(PANIC, 25.0, 2.0)
    assert c.handle([CC1, 25, 0], 2.1) is None


def test_soft_pedal_as_foot_switch_when_configured():
    c = Controls(cc_end_call=67)
    assert c.handle([CC1, 24, 127], 1.0) is None
    assert c.handle([CC1, 67, 127], 2.0).kind == END_CALL
    assert Controls().handle([CC1, 67, 127], 2.0) is None  # by default the soft pedal is musical


def test_daw_all_sound_off_and_all_notes_off_are_panics_whatever_their_value():
    c = Controls()
    assert c.handle([CC1, 120, 0], 1.0) == Action(PANIC, 120.0, 1.0)
    assert c.handle([CC1, 123, 0], 2.0) == Action(PANIC, 123.0, 2.0)
    assert c.handle([CC1, 123, 0], 3.0) == Action(PANIC, 123.0, 3.0)  # every one counts: no edge
    assert c.handle([CC1, 121, 0], 4.0) is None  # reset all controllers is not a panic


def test_channel_filter():
    c = Controls(in_channel=2)
    assert c.handle([CC1, 21, 100], 1.0) is None
    assert c.handle([CC1, 123, 0], 1.0) is None
    assert c.handle([CC2, 21, 100], 1.0).kind == SET_TEMPERATURE
    assert c.handle([CC2, 123, 0], 1.0).kind == PANIC
    every = Controls(in_channel=0)
    assert every.handle([0xBF, 25, 127], 1.0).kind == PANIC


def test_non_controls_pass_through_as_none():
    c = Controls()
    for msg in ([0x90, 21, 100], [0x80, 21, 0], [CC1, 64, 127], [CC1, 1, 64], [0xE0, 0, 64], [0xF8], []):
        assert c.handle(msg, 1.0) is None


def test_disabled_and_conflicting_assignments():
    c = Controls(cc_temperature=-1)
    assert c.handle([CC1, 21, 100], 1.0) is None
    with pytest.raises(ControlConfigError, match="both use CC 22"):
        Controls(cc_temperature=22)
    with pytest.raises(ControlConfigError, match="sustain"):
        Controls(cc_panic=64)
    with pytest.raises(ControlConfigError, match="0-119"):
        Controls(cc_enable=123)
    with pytest.raises(ControlConfigError):
        Controls(in_channel=17)


def test_from_config_uses_the_jam_flags():
    cfg = JamConfig(in_channel=3, cc_temperature=30, cc_end_call=67, cc_panic=-1)
    c = Controls.from_config(cfg)
    assert c.handle([0xB2, 30, 127], 1.0).value == pytest.approx(2.0)
    assert c.handle([0xB2, 67, 127], 1.0).kind == END_CALL
    assert c.handle([0xB2, 25, 127], 1.0) is None
    assert c.handle([0xB0, 30, 0], 1.0) is None
