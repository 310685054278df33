"""Shared fixtures. Append new fixtures; keep each one's setup cost stated in its docstring."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


def _load_jackclient():
    """tests/jackclient.py as module `jackclient`: pytest's importlib mode puts no test folder on
    sys.path, so the JACK tests take it from sys.modules (loaded here, before them)."""
    spec = importlib.util.spec_from_file_location("jackclient", Path(__file__).with_name("jackclient.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["jackclient"] = module
    spec.loader.exec_module(module)
    return module


jam_model = _load_jackclient().jam_model  # a module-scoped fixture for the JACK tests


@dataclass
class TinyModel:
    model: object  # antiphon.models.gpt.GPT, in eval mode
    cfg: object  # ModelConfig
    checkpoint: Path
    onnx: Path
    int8: Path
    tokens: list[int]  # real codec tokens the model was fitted to
    report: object  # VerifyReport of the fp32 export


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    """2 layers, d_model 64, context 128, briefly fitted to a codec-encoded phrase so its logits
    are peaked like a trained model's (random weights give flat logits that hide int8 error),
    saved as a checkpoint, exported to fp32 and int8 ONNX and verified. About 10 s, once."""
    import torch

    from antiphon.daemon import vocab as V
    from antiphon.daemon.config import ModelConfig
    from antiphon.export.onnx_export import export_model
    from antiphon.export.quantize import quantize_int8
    from antiphon.export.verify import demo_tokens, verify
    from antiphon.models.checkpoint import load_model, save_checkpoint
    from antiphon.models.gpt import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V.VOCAB_SIZE, n_layer=2, n_head=2, d_model=64, context=128, dropout=0.0)
    model = GPT(cfg)
    tokens = demo_tokens(600)
    data = torch.tensor(tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: OpenMP wake-ups cost more than they save on a shared box
    for _ in range(60):
        starts = torch.randint(0, len(tokens) - 65, (8,))
        x = torch.stack([data[s:s + 64] for s in starts])
        y = torch.stack([data[s + 1:s + 65] for s in starts])
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    root = tmp_path_factory.mktemp("tiny")
    save_checkpoint(root / "tiny.pt", model, cfg, {"step": 60, "run_id": "tiny-test"})
    model, cfg, meta = load_model(root / "tiny.pt")
    onnx_path = export_model(model, cfg, root / "tiny.onnx", meta["run_id"])
    report = verify(str(onnx_path), model, cfg, tokens, "fp32", meta["run_id"], log=lambda s: None)
    int8 = quantize_int8(onnx_path, root / "tiny.int8.onnx")
    return TinyModel(model, cfg, root / "tiny.pt", onnx_path, int8, tokens, report)


# --------------------------------------------------------------------------- system programs

# program -> the Debian/Ubuntu package that provides it (tests/setup-and-run installs them all).
SYSTEM_PACKAGES = {"jackd": "jackd2", "fluidsynth": "fluidsynth", "abc2midi": "abcmidi",
                   "jack_midi_clock": "jack-midi-clock"}


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(what: str, package: str) -> None:
    """Skip the test (fail it under CI=true, where every package must be there) for want of `package`."""
    msg = (f"needs {what}: install the Debian/Ubuntu package {package} (sudo apt-get install {package}; "
           "tests/setup-and-run installs it when run as root)")
    if on_ci():
        pytest.fail(f"CI=true: {msg}", pytrace=False)
    pytest.skip(msg)


def system_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"the program {name}", SYSTEM_PACKAGES[name])
    return path


@pytest.fixture(scope="session")
def jackd() -> str:
    """Debian's JACK server, and a python-rtmidi that can talk to it."""
    path = system_program("jackd")
    import rtmidi

    if rtmidi.API_UNIX_JACK not in rtmidi.get_compiled_api():
        from antiphon.daemon.ports import REBUILD_RTMIDI

        missing("a python-rtmidi built with JACK", f"libjack-jackd2-dev (then: {REBUILD_RTMIDI})")
    return path


@pytest.fixture(scope="session")
def fluidsynth() -> str:
    """FluidSynth and a General MIDI soundfont, for rendering audio."""
    path = system_program("fluidsynth")
    from antiphon.daemon.errors import UserError
    from antiphon.daemon.offline.render import find_soundfont

    try:
        find_soundfont()
    except UserError:
        missing("a General MIDI soundfont", "fluid-soundfont-gm")
    return path


@pytest.fixture(scope="session")
def abc2midi() -> str:
    return system_program("abc2midi")


@pytest.fixture(scope="session")
def jack_midi_clock() -> str:
    return system_program("jack_midi_clock")


# --------------------------------------------------------------------------- JACK (jam, ports, bench --live)

@pytest.fixture(scope="session")
def jack_server(jackd):
    """A private headless jackd (dummy driver, 48 kHz, period 64) for the whole session; about 1 s
    to start. Use the `jack` fixture in tests: it restarts the server when it stopped answering."""
    from antiphon.daemon.rigs.jackserver import JackServer

    server = JackServer().start()
    yield server
    server.stop()


@pytest.fixture()
def jack(jack_server):
    """The session's JACK server, checked (and restarted if hung) before each test."""
    return jack_server.ensure()
