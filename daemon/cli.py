"""The `antiphon` command.

Argument parsing lives here, torch-free; each subcommand's work lives in its own module and
is imported only when that subcommand runs, so `antiphon --help`, `ports` and `jam` never load
PyTorch. Flags that configure a dataclass are generated from its fields, so every flag
has a config field, a typed default and a help text in one place (daemon/config.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

from antiphon.daemon.config import (
    DataConfig,
    DemoConfig,
    JamConfig,
    ModelConfig,
    Steers,
    TrainConfig,
    TuneConfig,
    from_dict,
)
from antiphon.daemon.errors import UserError


def _flag_help(f: dataclasses.Field, note: str = "") -> str:
    # argparse %-formats help text; a config's "±10 %" must reach it as text.
    return f"{f.metadata.get('help', '')} (default: {f.default!r}{note})".replace("%", "%%")


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(f"{cls.__name__} (config-file keys are the field names)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        help_ = _flag_help(f)
        if f.type in (bool, "bool"):
            group.add_argument(*flags, dest=f"{cls.__name__}.{f.name}", action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(*flags, dest=f"{cls.__name__}.{f.name}", type=type(f.default),
                               default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_)


def build_config(cls: type, args: argparse.Namespace, file_section: dict[str, Any] | None = None) -> Any:
    """Defaults, overridden by the config file's section, overridden by explicit flags."""
    values = dict(file_section or {})
    prefix = cls.__name__ + "."
    values.update({k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)})
    return from_dict(cls, values)


def read_config_file(path: str | None) -> dict[str, Any]:
    """A JSON file whose top-level keys name config sections: {"TrainConfig": {...}, ...}."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a JSON object of sections such as 'TrainConfig'")
    return data


def configs(args: argparse.Namespace, *classes: type) -> list[Any]:
    file_data = read_config_file(getattr(args, "config", None))
    try:
        return [build_config(cls, args, file_data.get(cls.__name__)) for cls in classes]
    except (TypeError, ValueError) as e:
        raise UserError(f"bad configuration: {e}") from e


# --------------------------------------------------------------------------- subcommands

def _ports(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", default="", help="MIDI API: alsa, jack, coremidi, winmm (default: $RTMIDI_API or platform)")
    p.add_argument("--json", action="store_true", help="print the port lists as JSON")


def _jam(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON config file with a 'JamConfig' section")
    add_config_args(p, JamConfig)


def _demo(p: argparse.ArgumentParser) -> None:
    add_config_args(p, DemoConfig)


def _tokenize(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="MIDI file to encode")
    p.add_argument("-o", "--output", help="write decode(encode(input)) here, to hear what the model sees")
    p.add_argument("--json", action="store_true", help="print counts as JSON")
    p.add_argument("--tokens", action="store_true", help="also print the tokens, one per line")


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build"], help="build: assemble the training corpus")
    p.add_argument("--config", help="JSON config file with a 'DataConfig' section")
    add_config_args(p, DataConfig)


def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON config file with 'TrainConfig' and 'ModelConfig' sections")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-at", type=int, default=0, metavar="STEP",
                   help="stop with a checkpoint after this step, keeping the --steps schedule (continue with --resume)")
    add_config_args(p, TrainConfig)
    add_config_args(p, ModelConfig, skip=("vocab_size",))


def _tune(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="folders of your recordings (`jam --record DIR` sessions: the player track only) "
                        "and other MIDI files of your playing")
    p.add_argument("--config", help="JSON config file with a 'TuneConfig' section")
    add_config_args(p, TuneConfig)


def _sampling(p: argparse.ArgumentParser) -> None:
    """The jam's sampling flags, with its defaults and help, for the offline commands."""
    for steer in dataclasses.fields(Steers):
        f = JamConfig.__dataclass_fields__[steer.name]
        p.add_argument("--" + steer.name.replace("_", "-"), type=float, default=f.default,
                       help=_flag_help(f, ", as jam"))


def _eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="checkpoint (.pt) or ONNX model (default: the shipped model)")
    p.add_argument("--midi", required=True, help="folder of MIDI files to evaluate on")
    p.add_argument("--data", default="data/corpus", help="corpus whose training split trains the Markov baseline")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-files", type=int, default=0, help="evaluate at most this many files (0: all)")
    p.add_argument("--phrases", type=int, default=32, help="held-out phrases for the musical metrics (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for the musical metrics")
    p.add_argument("--rolls", default="", metavar="DIR",
                   help="draw piano rolls of the first held-out calls (call, answer, true continuation) into DIR")
    p.add_argument("--session", action=argparse.BooleanOptionalAction, default=True,
                   help="also stream each file token by token as a jam session (sliding window, session "
                        "memory) and report that NLL with and without the memory, and the memory constants "
                        "that fit this set best (default: on)")
    _sampling(p)
    p.add_argument("--markov-order", type=int, default=4,
                   help="longest context of the Markov baseline (4 scored best on valid_score; longer overfits)")
    p.add_argument("--markov-discount", type=float, default=0.95,
                   help="baseline smoothing: absolute discount in (0, 1], or 0 for PPM-C escapes")


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="training checkpoint (.pt) to export")
    p.add_argument("-o", "--output", help="ONNX file to write")
    p.add_argument("--int8", action="store_true", help="also write an int8 dynamically quantized model (CPU)")
    p.add_argument("--fp16", action="store_true", help="also write an fp16 model (GPU)")
    p.add_argument("--verify", nargs=2, metavar=("MODEL_ONNX", "CHECKPOINT"),
                   help="verify an exported model against its checkpoint and exit")
    p.add_argument("--midi", default="", help="MIDI file whose tokens drive verification (default: a built-in phrase)")
    p.add_argument("--layout", choices=["gqa", "portable"], default="gqa",
                   help="KV-cache graph: gqa (ONNX Runtime's fused attention, fastest) or portable (plain ONNX ops)")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="torch.onnx exporter for --layout portable (both give the same graph contract)")


def _bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="ONNX model (default: the shipped model)")
    p.add_argument("--checkpoint", default="", help="checkpoint for the PyTorch rows (default: shipped)")
    p.add_argument("--live", action="store_true", help="measure the jam daemon over a real JACK server")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (for tests)")
    p.add_argument("--random", action="store_true",
                   help="measure a randomly initialised model of the default ModelConfig shape instead")


def _continue(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="MIDI file to continue")
    p.add_argument("-o", "--output", required=True, help="MIDI file to write (input + continuation track)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, help="length of the continuation in seconds")
    length.add_argument("--bars", type=float, help="length of the continuation in bars of the file's tempo")
    p.add_argument("--seed", type=int, default=-1, help="sampling seed (-1: random)")
    _sampling(p)
    p.add_argument("--model", default="", help="ONNX model (default: the shipped model)")


def _render(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="MIDI file to render (e.g. from `continue` or `jam --record`)")
    p.add_argument("--png", help="piano-roll picture to write")
    p.add_argument("--wav", help="audio to write with FluidSynth")
    p.add_argument("--soundfont", default="", help="General MIDI .sf2 (default: Debian's standard paths)")


# name: (help, "module:function", add-arguments). The function takes the parsed args.
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "jam": ("listen on a MIDI port and answer the player", "antiphon.daemon.jam:main", _jam),
    "demo": ("hear antiphon answer a bundled call: writes MIDI, a piano roll and a WAV", "antiphon.daemon.offline.demo:main",
             _demo),
    "ports": ("list MIDI input and output ports", "antiphon.daemon.ports:main", _ports),
    "tokenize": ("encode a MIDI file to tokens (and back)", "antiphon.daemon.tokenize:main", _tokenize),
    "continue": ("continue a MIDI file offline", "antiphon.daemon.offline.continuation:main", _continue),
    "render": ("draw a piano roll / render audio of a MIDI file", "antiphon.daemon.offline.render:main", _render),
    "data": ("build the training corpus", "antiphon.models.corpus:main", _data),
    "train": ("train a model", "antiphon.models.train:main", _train),
    "eval": ("evaluate a model against the Markov baseline", "antiphon.models.evaluate:main", _eval),
    "tune": ("fine-tune the model on your own recordings", "antiphon.models.tune:main", _tune),
    "export": ("export a checkpoint to ONNX and verify it", "antiphon.export.cli:main", _export),
    "bench": ("measure decode latency (or --live: the daemon)", "antiphon.export.bench:main", _bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="antiphon", description="A real-time MIDI improvisation partner.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, _target, add_args) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module_name, func_name = COMMANDS[args.command][1].split(":")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name in ("torch", "onnx", "onnxscript", "music21", "matplotlib"):
                raise UserError(f"`antiphon {args.command}` needs {e.name}: pip install 'antiphon[train]'") from e
            raise
        return int(getattr(module, func_name)(args) or 0)
    except UserError as e:
        print(f"antiphon {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
