"""Echo guard: antiphon's own output coming back is recognised; the player is not."""

from __future__ import annotations

from antiphon.daemon.echo import EchoGuard, message_key

T = 500.0
MS = 0.001


def test_echo_within_the_window_on_any_channel_is_recognised_once():
    g = EchoGuard(window_s=30 * MS)
    g.sent([0x90, 60, 70], T)
    assert g.is_echo([0x94, 60, 70], T + 4 * MS)  # the DAW re-channelled it
    assert not g.is_echo([0x90, 60, 70], T + 5 * MS)  # one send excuses one copy: this is the player
    assert g.echoes == 1


def test_replay_after_the_window_or_with_another_velocity_is_the_player():
    g = EchoGuard(window_s=30 * MS)
    g.sent([0x90, 60, 70], T)
    assert not g.is_echo([0x90, 60, 71], T + 3 * MS)
    assert not g.is_echo([0x90, 61, 70], T + 3 * MS)
    assert not g.is_echo([0x90, 60, 70], T + 31 * MS)
    assert g.echoes == 0


def test_note_off_forms_are_interchangeable_and_cc_is_matched_by_value():
    g = EchoGuard()
    g.sent([0x80, 60, 0], T)
    assert g.is_echo([0x90, 60, 0], T + MS)
    g.sent([0x90, 62, 0], T + 2 * MS)
    assert g.is_echo([0x80, 62, 64], T + 3 * MS)
    g.sent([0xB0, 64, 127], T + 4 * MS)
    assert not g.is_echo([0xB0, 64, 0], T + 5 * MS)
    assert g.is_echo([0xB0, 64, 127], T + 5 * MS)
    assert message_key([0xF8]) == -1 and message_key([0x90, 60]) == -1


def test_input_stamped_slightly_before_the_send_was_recorded_still_counts():
    g = EchoGuard(window_s=30 * MS, early_s=2 * MS)
    g.sent([0x90, 60, 70], T)
    assert g.is_echo([0x90, 60, 70], T - 1 * MS)
    g.sent([0x90, 64, 70], T + 10 * MS)
    assert not g.is_echo([0x90, 64, 70], T + 5 * MS)  # 5 ms before it was sent: the player got there first


def test_a_chord_comes_back_note_for_note():
    g = EchoGuard()
    chord = [(60, 80), (64, 80), (67, 80), (60, 80)]  # the same key twice: two sends, two echoes
    for i, (p, v) in enumerate(chord):
        g.sent([0x90, p, v], T + i * 0.1 * MS)
    echoes = [g.is_echo([0x90, p, v], T + 3 * MS) for p, v in chord]
    assert echoes == [True, True, True, True]
    assert not g.is_echo([0x90, 60, 80], T + 3 * MS)


def test_the_ring_is_fixed_and_old_sends_are_forgotten():
    g = EchoGuard(window_s=30 * MS, capacity=64)
    sizes = (len(g._keys), len(g._times))
    for i in range(10_000):
        g.sent([0x90, i % 128, 1 + i % 127], T + i * MS)
    assert (len(g._keys), len(g._times)) == sizes
    last = T + 9_999 * MS
    assert g.is_echo([0x90, 9_999 % 128, 1 + 9_999 % 127], last + MS)
    i = 9_950  # sent 50 ms before: outside the window
    assert not g.is_echo([0x90, i % 128, 1 + i % 127], last + MS)


def test_warning_is_given_once_and_only_after_an_echo():
    g = EchoGuard()
    assert g.take_warning() is None
    g.sent([0x90, 60, 70], T)
    g.sent([0x90, 62, 70], T)
    g.is_echo([0x90, 60, 70], T + MS)
    msg = g.take_warning()
    assert msg is not None and "thru" in msg
    g.is_echo([0x90, 62, 70], T + MS)
    assert g.take_warning() is None and g.echoes == 2


def test_window_zero_switches_the_guard_off():
    g = EchoGuard.from_config(0.0)
    assert not g.enabled
    g.sent([0x90, 60, 70], T)
    assert not g.is_echo([0x90, 60, 70], T + MS)
    assert EchoGuard.from_config(30.0).window_s == 0.030
