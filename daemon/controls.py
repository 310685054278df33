"""Live control from a controller's knobs and buttons, and the DAW's panic messages.

Defaults (each CC number is a JamConfig field; -1 switches that control off):

    CC 21  temperature        0..127 -> 0.2..2.0, geometric (89 ~ 1.0): equal knob travel, equal ratio
    CC 22  answer length      0..127 -> answer_scale 0.25..4.0, geometric (64 ~ 1.0)
    CC 23  antiphon on / off  >= 64 on, < 64 off (a toggle button or a switch)
    CC 24  end the call now   on the press: the value rising from < 64 to >= 64
    CC 25  panic              on the press
    CC 26  session memory     0..127 -> --memory 0..1, linear (0: answers ignore the session memory)
    CC 120 all sound off, CC 123 all notes off (sent by DAWs on stop): always a panic

End-of-call defaults to CC 24 rather than the soft pedal (CC 67) because pianists use the soft
pedal musically; `--cc-end-call 67` makes it a foot switch. Presses are edges, not levels, so a
pedal held down or a button's release does not fire again.

`Controls.handle` turns one message into at most one `Action` for the jam loop to apply; it
keeps the little state that edges need, so call it from one thread, in arrival order. Messages
on other channels than --in-channel (when set) are not controls.
"""

from __future__ import annotations

from typing import NamedTuple

from antiphon.daemon.config import JamConfig
from antiphon.daemon.errors import UserError

CC_STATUS = 0xB0
CC_SUSTAIN, CC_ALL_SOUND_OFF, CC_ALL_NOTES_OFF = 64, 120, 123
PRESSED = 64

TEMPERATURE_RANGE = (0.2, 2.0)
ANSWER_SCALE_RANGE = (0.25, 4.0)

# Action kinds
SET_TEMPERATURE, SET_ANSWER_SCALE, ENABLE, END_CALL, PANIC, SET_MEMORY = range(6)
KIND_NAMES = ("temperature", "answer_scale", "enable", "end_call", "panic", "memory")


class Action(NamedTuple):
    kind: int  # SET_TEMPERATURE, SET_ANSWER_SCALE, ENABLE, END_CALL or PANIC
    value: float  # the new temperature / answer_scale / memory; 1.0 on, 0.0 off; the CC number for PANIC/END_CALL
    t: float  # arrival time of the message that caused it

    def describe(self) -> str:
        if self.kind == ENABLE:
            return "answering " + ("on" if self.value else "off")
        if self.kind in (PANIC, END_CALL):
            return f"{KIND_NAMES[self.kind]} (CC {int(self.value)})"
        return f"{KIND_NAMES[self.kind]} {self.value:.2f}"


class ControlConfigError(UserError, ValueError):
    """CC assignments that collide or that MIDI reserves; the message says which."""


def geometric(value: int, lo: float, hi: float) -> float:
    """0..127 onto lo..hi so that equal knob steps multiply by equal ratios."""
    return lo * (hi / lo) ** (min(max(value, 0), 127) / 127.0)


def cc_to_temperature(value: int) -> float:
    return geometric(value, *TEMPERATURE_RANGE)


def cc_to_answer_scale(value: int) -> float:
    return geometric(value, *ANSWER_SCALE_RANGE)


class Controls:
    def __init__(self, in_channel: int = 0, cc_temperature: int = 21, cc_length: int = 22,
                 cc_enable: int = 23, cc_end_call: int = 24, cc_panic: int = 25, cc_memory: int = 26) -> None:
        if not 0 <= in_channel <= 16:
            raise ControlConfigError(f"in_channel {in_channel} is not 0 (all) or 1-16")
        assigned = {"cc_temperature": cc_temperature, "cc_length": cc_length, "cc_enable": cc_enable,
                    "cc_end_call": cc_end_call, "cc_panic": cc_panic, "cc_memory": cc_memory}
        used: dict[int, str] = {}
        for name, cc in assigned.items():
            if cc == -1:
                continue
            if not 0 <= cc <= 119:
                raise ControlConfigError(f"--{name.replace('_', '-')} {cc}: use 0-119 (120-127 are MIDI channel "
                                         "mode messages) or -1 for none")
            if cc == CC_SUSTAIN:
                raise ControlConfigError(f"--{name.replace('_', '-')} 64 is the sustain pedal, which antiphon "
                                         "plays from; choose another CC")
            if cc in used:
                raise ControlConfigError(f"--{name.replace('_', '-')} and --{used[cc].replace('_', '-')} "
                                         f"both use CC {cc}")
            used[cc] = name
        self.channel = in_channel - 1  # -1: every channel
        # One small table indexed by CC number: a lookup per message, no branching on config.
        self._kind = [-1] * 128
        for cc, kind in ((cc_temperature, SET_TEMPERATURE), (cc_length, SET_ANSWER_SCALE), (cc_enable, ENABLE),
                         (cc_end_call, END_CALL), (cc_panic, PANIC), (cc_memory, SET_MEMORY)):
            if cc >= 0:
                self._kind[cc] = kind
        self._kind[CC_ALL_SOUND_OFF] = self._kind[CC_ALL_NOTES_OFF] = PANIC
        self._last = [0] * 128  # last value per CC, for edges and de-duplication
        self._seen = [False] * 128
        self.enabled = True
        self.temperature: float | None = None  # None until a knob has been moved
        self.answer_scale: float | None = None
        self.memory: float | None = None

    @classmethod
    def from_config(cls, cfg: JamConfig) -> Controls:
        return cls(cfg.in_channel, cfg.cc_temperature, cfg.cc_length, cfg.cc_enable, cfg.cc_end_call, cfg.cc_panic,
                   cfg.cc_memory)

    def handle(self, msg: list[int] | tuple[int, ...], t: float) -> Action | None:
        """The action one incoming message asks for, or None (the common case: not a control)."""
        if len(msg) < 3 or msg[0] & 0xF0 != CC_STATUS:
            return None
        if self.channel >= 0 and msg[0] & 0x0F != self.channel:
            return None
        cc, value = msg[1] & 0x7F, msg[2] & 0x7F
        kind = self._kind[cc]
        if kind < 0:
            return None
        previous, seen = self._last[cc], self._seen[cc]
        self._last[cc], self._seen[cc] = value, True
        if cc in (CC_ALL_SOUND_OFF, CC_ALL_NOTES_OFF):
            return Action(PANIC, float(cc), t)  # a channel mode message: its value carries nothing
        if kind == SET_TEMPERATURE:
            if seen and value == previous:
                return None
            self.temperature = cc_to_temperature(value)
            return Action(kind, self.temperature, t)
        if kind == SET_ANSWER_SCALE:
            if seen and value == previous:
                return None
            self.answer_scale = cc_to_answer_scale(value)
            return Action(kind, self.answer_scale, t)
        if kind == SET_MEMORY:
            if seen and value == previous:
                return None
            self.memory = value / 127.0
            return Action(kind, self.memory, t)
        if kind == ENABLE:
            on = value >= PRESSED
            if on == self.enabled:
                return None
            self.enabled = on
            return Action(kind, 1.0 if on else 0.0, t)
        if value >= PRESSED > previous:
            return Action(kind, float(cc), t)  # END_CALL or PANIC, on the press only
        return None
