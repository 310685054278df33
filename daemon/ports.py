"""MIDI ports: choose the API, list ports, open virtual ports or existing ones by index or name.

rtmidi is imported lazily so that `antiphon --help` and the unit tests never need a MIDI
system. On JACK every rtmidi object is its own JACK client and client names must be unique, so
the virtual ports appear as `antiphon:in` and `antiphon-out:out`; on ALSA and CoreMIDI both
appear under the client name `antiphon` as ports `in` and `out`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from antiphon.daemon.errors import UserError

API_NAMES = {"alsa": "API_LINUX_ALSA", "jack": "API_UNIX_JACK", "coremidi": "API_MACOSX_CORE",
             "winmm": "API_WINDOWS_MM"}
# RTMIDI_API also accepts the spellings rtmidi and mido use (LINUX_ALSA, UNIX_JACK, ...).
_ALIASES = {"linux_alsa": "alsa", "unix_jack": "jack", "macosx_core": "coremidi", "windows_mm": "winmm"}


class PortError(UserError):
    """A port that cannot be found or opened; the message lists what exists."""


def rtmidi_module() -> Any:
    try:
        import rtmidi
    except ImportError as e:  # pragma: no cover - python-rtmidi is a hard dependency
        raise UserError("python-rtmidi is not installed: pip install python-rtmidi") from e
    return rtmidi


def api_name(api: str = "") -> str:
    """Normalise --api / $RTMIDI_API to one of API_NAMES, or '' for the platform default."""
    raw = (api or os.environ.get("RTMIDI_API", "")).strip().lower()
    raw = raw.removeprefix("api_")
    raw = _ALIASES.get(raw, raw)
    if raw and raw not in API_NAMES:
        raise UserError(f"unknown MIDI API {raw!r}: choose one of {', '.join(API_NAMES)}")
    return raw


def resolve_api(api: str = "") -> int:
    """The rtmidi API constant, refusing APIs this python-rtmidi was built without."""
    rtmidi = rtmidi_module()
    name = api_name(api)
    if not name:
        return rtmidi.API_UNSPECIFIED
    const = getattr(rtmidi, API_NAMES[name])
    compiled = rtmidi.get_compiled_api()
    if const not in compiled:
        have = [k for k, v in API_NAMES.items() if getattr(rtmidi, v) in compiled]
        raise UserError(f"this python-rtmidi has no {name} support (it has: {', '.join(have) or 'none'})")
    return const


REBUILD_RTMIDI = "pip install --force-reinstall --no-deps --no-binary python-rtmidi python-rtmidi"


def bundled_libjack(files: Sequence[Any] | None = None) -> str:
    """The libjack that python-rtmidi's PyPI wheel carries inside it ('' when rtmidi was built
    against the system's libjack). `files`: the installed distribution's file list (for tests)."""
    if files is None:
        import importlib.metadata as md

        try:
            files = md.files("python-rtmidi") or []
        except md.PackageNotFoundError:
            return ""
    lib = next((f for f in files if os.path.basename(str(f)).startswith("libjack")), None)
    if lib is None:
        return ""
    return str(lib.locate()) if hasattr(lib, "locate") else str(lib)


def jack_advice(api: str = "", files: Sequence[Any] | None = None) -> str:
    """What to tell a JACK user whose python-rtmidi carries its own libjack ('' when all is well).

    The wheel's libjack 1.9.22 hung Debian's 1.9.21 server in 5 of 30 runs here (DESIGN.md 2), and
    a private libjack never reaches PipeWire's JACK, which is reached through the system's libjack."""
    if api_name(api) != "jack":
        return ""
    lib = bundled_libjack(files)
    if not lib:
        return ""
    return (f"warning: this python-rtmidi carries its own libjack ({lib}), which can hang a JACK server "
            "or miss PipeWire's JACK. Build it against your system's libjack (Debian/Ubuntu: sudo apt-get "
            f"install libjack-jackd2-dev libasound2-dev pkg-config build-essential), then: {REBUILD_RTMIDI}")


def _hint(api: str) -> str:
    name = api_name(api)
    if name == "jack":
        return "is a JACK server running? (jackd -d dummy, or your usual JACK setup; see $JACK_DEFAULT_SERVER)"
    if name == "alsa" or (not name and os.name == "posix"):
        return "is the ALSA sequencer available (/dev/snd/seq)? Without a sound card try --api jack"
    return "is a MIDI system available?"


def make(kind: str, api: str = "", client: str = "antiphon") -> Any:
    """A MidiIn ('in') or MidiOut ('out'), turning rtmidi's bare errors into ones that say what to do."""
    rtmidi = rtmidi_module()
    cls = rtmidi.MidiIn if kind == "in" else rtmidi.MidiOut
    try:
        return cls(resolve_api(api), name=client)
    except rtmidi.RtMidiError as e:
        raise PortError(f"cannot open the MIDI system ({e}); {_hint(api)}") from e


def list_ports(api: str = "") -> tuple[list[str], list[str]]:
    """(input ports, output ports): ports antiphon can read from and send to."""
    midi_in, midi_out = make("in", api, "antiphon-list"), make("out", api, "antiphon-list")
    try:
        return list(midi_in.get_ports()), list(midi_out.get_ports())
    finally:
        release(midi_in)
        release(midi_out)


def find_port(ports: Sequence[str], spec: str, what: str) -> int:
    """Index of the port named by `spec`: an index, an exact name, or a unique name substring."""
    listing = "; ".join(f"{i}: {p}" for i, p in enumerate(ports)) or "none"
    spec = spec.strip()
    if spec.lstrip("-").isdigit():
        i = int(spec)
        if 0 <= i < len(ports):
            return i
        raise PortError(f"no {what} port with index {i}; {what} ports are: {listing}")
    exact = [i for i, p in enumerate(ports) if p == spec]
    if exact:
        return exact[0]
    matches = [i for i, p in enumerate(ports) if spec.lower() in p.lower()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise PortError(f"no {what} port matches {spec!r}; {what} ports are: {listing}")
    names = ", ".join(repr(ports[i]) for i in matches)
    raise PortError(f"{what} port {spec!r} is ambiguous ({names}); give an index or a longer name. "
                    f"{what} ports are: {listing}")


def out_client_name(client: str, api: str = "") -> str:
    # JACK refuses two clients of one name (it would rename the second 'antiphon-01').
    return f"{client}-out" if api_name(api) == "jack" else client


def open_input(api: str, client: str, spec: str, callback: Callable[[tuple, Any], None],
               clock: bool = False) -> tuple[Any, str]:
    """Open the input (virtual 'in', or the existing port `spec`) and install the callback.
    `clock`: also deliver MIDI clock and transport (0xF8-0xFC), for following a DAW's tempo."""
    midi_in = make("in", api, client)
    try:
        # SysEx and active sensing are ignored (and clock unless followed): the callback sees notes,
        # controllers and, when asked, the DAW's clock.
        midi_in.ignore_types(sysex=True, timing=not clock, active_sense=True)
        if spec:
            idx = find_port(midi_in.get_ports(), spec, "input")
            name = midi_in.get_ports()[idx]
            midi_in.open_port(idx, "in")
        else:
            midi_in.open_virtual_port("in")
            name = f"{client}:in (virtual)"
        midi_in.set_callback(callback)
    except BaseException:
        release(midi_in)
        raise
    return midi_in, name


def open_output(api: str, client: str, spec: str) -> tuple[Any, str]:
    """Open the output (virtual 'out', or the existing port `spec`)."""
    out_client = out_client_name(client, api)
    midi_out = make("out", api, out_client)
    try:
        if spec:
            idx = find_port(midi_out.get_ports(), spec, "output")
            name = midi_out.get_ports()[idx]
            midi_out.open_port(idx, "out")
        else:
            midi_out.open_virtual_port("out")
            name = f"{out_client}:out (virtual)"
    except BaseException:
        release(midi_out)
        raise
    return midi_out, name


def release(port: Any) -> None:
    """Close and free an rtmidi object now. A JACK client left to interpreter exit can stall the
    whole JACK graph ("client ... was not finished"), so every path out closes its clients."""
    if hasattr(port, "cancel_callback"):
        port.cancel_callback()
    port.close_port()
    port.delete()


class OutputWatch:
    """Notices an existing output port vanishing and reopens it when it is back.

    Runs in the scheduler thread, the only thread that touches the MidiOut, and only when
    nothing is due soon; `check` returns True when the port was just reopened, so the caller
    can send a panic (the device may have lost our note-offs while it was gone).
    """

    def __init__(self, midi_out: Any, target: str) -> None:
        self.midi_out, self.target, self.present = midi_out, target, True

    def check(self) -> bool:
        if not self.target:
            return False  # a virtual port is ours: it cannot vanish
        ports = self.midi_out.get_ports()
        here = self.target in ports
        if here and not self.present:
            self.midi_out.close_port()
            self.midi_out.open_port(ports.index(self.target), "out")
        reopened = here and not self.present
        self.present = here
        return reopened


def main(args: Any) -> int:
    inputs, outputs = list_ports(getattr(args, "api", ""))
    if getattr(args, "json", False):
        print(json.dumps({"api": api_name(args.api) or "default", "inputs": inputs, "outputs": outputs}))
        return 0
    print(f"MIDI API: {api_name(args.api) or 'platform default'}")
    for title, ports in (("input ports (antiphon listens to; --in-port)", inputs),
                         ("output ports (antiphon plays to; --out-port)", outputs)):
        print(title + ":")
        for i, p in enumerate(ports):
            print(f"  {i}: {p}")
        if not ports:
            print("  (none)")
    return 0
