"""Make a trained checkpoint the model antiphon ships (a maintainer's step, run from a checkout):

    python -m antiphon.models.ship runs/NAME/best.pt [--record eval=EVAL.json ...]

- models/assets/default.pt: the checkpoint's weights in fp16, no optimizer (half the bytes that
  every shipped model leaves in the repository's history; loading casts back to fp32);
- daemon/assets/default.onnx and default.int8.onnx: exported from that file, so the ONNX models
  hold exactly the shipped weights, and verified against it (`antiphon export`);
- models/assets/default.json: where it came from: run ids, the training config and log (valid
  curve, tokens, wall time), the corpus's hashes, any `--record`ed eval JSON, and the lineage: the
  shipped model's stages so far, this run appended as the next (`--what`, `--command`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "assets" / "default.pt"
ONNX = ROOT / "daemon" / "assets" / "default.onnx"
RECORD = ROOT / "models" / "assets" / "default.json"
VERIFY_MIDI = "data/corpus/heldout/valid_perf/hannds__test__001-Satie-Gymnopedie_No1.mid"


def training_log(run_dir: Path) -> dict[str, Any]:
    from antiphon.models.train import read_log

    log = run_dir / "log.jsonl"
    rows = read_log(log) if log.is_file() else []
    steps = [r for r in rows if "train_loss" in r]
    curve = [r for r in rows if "valid_perf" in r]
    return {"steps_logged": len(steps),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steps) if steps else None,
            "valid_curve": curve}


def record(src: Path, meta: dict[str, Any], evals: dict[str, Any]) -> dict[str, Any]:
    from antiphon.models.shards import file_sha256

    tcfg = meta.get("train_config", {})
    corpus = Path(tcfg.get("data", "data/corpus"))
    files = {name: corpus / name for name in ("manifest.jsonl", "train.bin")}
    return {
        "what": "antiphon default model: decoder-only Transformer over performance-event tokens (vocab v"
                f"{meta['vocab']['version']})",
        "run_id": meta.get("run_id"),
        "parent_run_id": meta.get("parent_run_id"),
        "model_config": meta["model_config"],
        "checkpoint": {"file": str(CHECKPOINT.relative_to(ROOT)), "source": str(src), "weights": "fp16",
                       "sha256": file_sha256(CHECKPOINT), "step": meta.get("step"),
                       "best_valid_perf": meta.get("best_valid_perf")},
        "train_config": tcfg,
        "training": {"tokens_seen": meta.get("tokens_seen"), "wall_s": meta.get("wall_s"),
                     "final_valid": meta.get("valid"), **training_log(src.parent)},
        "corpus": {"dir": str(corpus), **{f"{k}_sha256": file_sha256(p) for k, p in files.items() if p.is_file()}},
        **evals,
    }


def lineage(meta: dict[str, Any], what: str, command: str) -> dict[str, Any]:
    """The shipped model's stages (from the record being replaced), this run's appended: a run
    started with --init from the shipped model continues its lineage."""
    old = json.loads(RECORD.read_text()).get("lineage", {}) if RECORD.is_file() else {}
    stages = [s for s in old.get("stages", []) if s.get("run_id") != meta.get("run_id")]
    stages.append({"stage": len(stages) + 1, "run_id": meta.get("run_id"), "what": what, "command": command,
                   "steps": meta.get("step"), "tokens_seen": meta.get("tokens_seen"), "wall_s": meta.get("wall_s")})
    return {"stages": stages, "tokens_seen_total": sum(s.get("tokens_seen") or 0 for s in stages),
            "wall_s_total": round(sum(s.get("wall_s") or 0.0 for s in stages), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m antiphon.models.ship", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the run's checkpoint to ship (its folder's log.jsonl is recorded too)")
    p.add_argument("--midi", default=VERIFY_MIDI, help="MIDI file whose tokens drive the export's verification")
    p.add_argument("--record", action="append", default=[], metavar="NAME=FILE",
                   help="an eval JSON (antiphon eval --json) to keep in default.json under NAME")
    p.add_argument("--what", default="", help="one line on this stage, for the lineage")
    p.add_argument("--command", default="", help="the `antiphon train` command of this stage, for the lineage")
    p.add_argument("--record-only", action="store_true",
                   help="only add the --record JSONs to the shipped model's default.json")
    args = p.parse_args(argv)
    from antiphon.daemon import cli
    from antiphon.models.checkpoint import save_half

    src = Path(args.checkpoint)
    evals = {}
    for item in args.record:
        name, _, file = item.partition("=")
        evals[name] = json.loads(Path(file).read_text())
    if args.record_only:  # add evals to the shipped model's record
        RECORD.write_text(json.dumps({**json.loads(RECORD.read_text()), **evals}, indent=1) + "\n")
        return 0
    meta = save_half(src, CHECKPOINT)
    stages = lineage(meta, args.what, args.command)  # before the record it extends is replaced
    if cli.main(["export", str(CHECKPOINT), "-o", str(ONNX), "--int8", "--midi", args.midi]) != 0:
        raise SystemExit(f"export of {CHECKPOINT} failed; {ONNX} is not the shipped model's")
    meta = {k: v for k, v in meta.items() if k != "model"}
    RECORD.write_text(json.dumps({**record(src, meta, evals), "lineage": stages}, indent=1) + "\n")
    print(f"shipped {src} as {CHECKPOINT.relative_to(ROOT)} (fp16 weights) and {ONNX.relative_to(ROOT)} (+ int8); "
          f"record in {RECORD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
