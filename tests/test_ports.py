"""Port choice: API names, name matching with errors that list what exists, the output watch,
and `antiphon ports` against a real JACK server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from antiphon.daemon import ports
from antiphon.daemon.errors import UserError
from antiphon.daemon.rigs.jackprobe import Probe

SYNTHS = ["Midi Through:Midi Through Port-0 14:0", "FLUID Synth (1234):Synth input port (1234:0) 128:0",
          "fluidsynth:midi_00", "Surge XT:in"]


def test_api_names_from_flag_or_environment(monkeypatch):
    monkeypatch.delenv("RTMIDI_API", raising=False)
    assert ports.api_name("") == ""
    assert ports.api_name("JACK") == "jack"
    monkeypatch.setenv("RTMIDI_API", "UNIX_JACK")
    assert ports.api_name("") == "jack"
    assert ports.api_name("alsa") == "alsa"  # the flag wins over the environment
    with pytest.raises(UserError, match="choose one of alsa, jack, coremidi, winmm"):
        ports.api_name("pulse")


def test_an_api_this_build_lacks_is_refused_by_name():
    with pytest.raises(UserError, match="no coremidi support .*jack"):
        ports.resolve_api("coremidi")


def test_ports_are_found_by_index_exact_name_or_unique_substring():
    assert ports.find_port(SYNTHS, "2", "output") == 2
    assert ports.find_port(SYNTHS, "fluidsynth:midi_00", "output") == 2
    assert ports.find_port(SYNTHS, "surge", "output") == 3
    assert ports.find_port(SYNTHS, "FLUID Synth", "output") == 1


def test_unknown_ambiguous_or_out_of_range_ports_list_what_exists():
    with pytest.raises(ports.PortError) as e:
        ports.find_port(SYNTHS, "pianoteq", "output")
    assert "no output port matches 'pianoteq'" in str(e.value)
    assert "0: Midi Through:Midi Through Port-0 14:0" in str(e.value) and "3: Surge XT:in" in str(e.value)
    with pytest.raises(ports.PortError, match="ambiguous .*FLUID Synth.*fluidsynth:midi_00"):
        ports.find_port(SYNTHS, "fluid", "output")
    with pytest.raises(ports.PortError, match="no input port with index 7; input ports are: none"):
        ports.find_port([], "7", "input")


class FakeOut:
    def __init__(self) -> None:
        self.listed, self.opened = ["synth:in"], []

    def get_ports(self):
        return list(self.listed)

    def close_port(self) -> None:
        self.opened.append("closed")

    def open_port(self, i: int, name: str) -> None:
        self.opened.append((self.listed[i], name))


def test_the_output_watch_reopens_a_port_that_came_back_exactly_once():
    out = FakeOut()
    watch = ports.OutputWatch(out, "synth:in")
    assert watch.check() is False
    out.listed = []
    assert watch.check() is False and watch.present is False
    out.listed = ["other:in", "synth:in"]
    assert watch.check() is True
    assert out.opened == ["closed", ("synth:in", "out")]
    assert watch.check() is False
    assert ports.OutputWatch(out, "").check() is False  # a virtual port is never watched


def run_cli(args: list[str], env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "antiphon.daemon", *args], check=False, capture_output=True,
                          text=True, env=env, timeout=60)


def test_ports_lists_what_a_jack_client_offers(jack):
    probe = Probe(jack, "lister")
    try:
        proc = run_cli(["ports", "--api", "jack", "--json"], env=jack.env)
        assert proc.returncode == 0, proc.stderr
        listing = json.loads(proc.stdout)
        assert listing["api"] == "jack"
        assert probe.play_port in listing["inputs"]  # its output is something antiphon can listen to
        assert probe.hear_port in listing["outputs"]
        text = run_cli(["ports", "--api", "jack"], env=jack.env).stdout
        assert f": {probe.play_port}" in text and "--out-port" in text
    finally:
        probe.close()


def test_ports_without_the_midi_system_says_what_to_do():
    proc = run_cli(["ports", "--api", "alsa"])
    if Path("/dev/snd/seq").exists():  # a machine with ALSA: the listing simply works
        assert proc.returncode == 0 and "input ports" in proc.stdout
    else:
        assert proc.returncode == 2
        assert "cannot open the MIDI system" in proc.stderr and "--api jack" in proc.stderr


def test_jack_users_of_the_rtmidi_wheel_are_told_how_to_rebuild_it(monkeypatch):
    monkeypatch.delenv("RTMIDI_API", raising=False)
    wheel = ["rtmidi/__init__.py", "rtmidi/_rtmidi.cpython-311-x86_64-linux-gnu.so",
             "python_rtmidi.libs/libjack-5305d520.so.0.1.0"]
    source_build = wheel[:2]
    advice = ports.jack_advice("jack", wheel)
    assert "python_rtmidi.libs/libjack-5305d520.so.0.1.0" in advice
    assert "pip install --force-reinstall --no-deps --no-binary python-rtmidi python-rtmidi" in advice
    assert ports.jack_advice("jack", source_build) == ""
    assert ports.jack_advice("alsa", wheel) == ""  # only JACK goes through the bundled library
    monkeypatch.setenv("RTMIDI_API", "jack")
    assert ports.jack_advice("", wheel) == advice
    # The same command is the README's, so a user reading either gets one answer.
    assert ports.REBUILD_RTMIDI in (Path(__file__).parents[1] / "README.md").read_text()
