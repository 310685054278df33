"""Training runs compared at equal wall time: which model size buys the lower held-out loss for
the same minutes of this machine (docs/model.md). Reads each run's log.jsonl (the held-out
losses `antiphon train` logs at every evaluation, with the wall time since the run began) and
prints, per run, the losses at common times and at its end; with --png, the curves by minute.

    python -m antiphon.models.wallclock runs/size-3m runs/size-11m --png docs/size-by-wall-time.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("valid_perf", "valid_score")


def eval_rows(run: str | Path) -> list[dict[str, Any]]:
    """The run's held-out evaluations, in order: step, wall_s and the split losses."""
    rows = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "wall_s" in r and all(s in r for s in SPLITS)]


def at_minutes(rows: list[dict[str, Any]], minutes: float, split: str) -> float | None:
    """The split's loss at `minutes` into the run, linear between evaluations (None: past its end)."""
    t = np.array([r["wall_s"] for r in rows]) / 60.0
    if not len(t) or minutes > t[-1] + 1e-9:
        return None
    return float(np.interp(minutes, t, [r[split] for r in rows]))


def compare(runs: dict[str, list[dict[str, Any]]], every_min: float = 10.0) -> dict[str, Any]:
    """Per run: its end (minutes, step, losses) and its losses every `every_min` minutes up to the
    shortest run's end, where all of them can be read."""
    common = min(rows[-1]["wall_s"] for rows in runs.values()) / 60.0
    marks = [*np.arange(every_min, common, every_min).tolist(), common]
    return {name: {"end": {"minutes": round(rows[-1]["wall_s"] / 60.0, 1), "step": rows[-1]["step"],
                           **{s: round(rows[-1][s], 4) for s in SPLITS}},
                   "at_minutes": {f"{m:.1f}": {s: round(at_minutes(rows, m, s), 4) for s in SPLITS} for m in marks}}
            for name, rows in runs.items()}


def plot(runs: dict[str, list[dict[str, Any]]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, split in zip(axes, SPLITS):
        for i, (name, rows) in enumerate(runs.items()):
            ax.plot([r["wall_s"] / 60.0 for r in rows], [r[split] for r in rows], "o-", ms=3, color=f"C{i}", label=name)
        ax.set_title(f"{split} (held out)")
        ax.set_xlabel("wall minutes")
        ax.set_ylabel("nats / token")
        ax.set_ylim(top=min(ax.get_ylim()[1], 1.6 * min(r[split] for rows in runs.values() for r in rows)))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m antiphon.models.wallclock", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders of `antiphon train` (each with its log.jsonl)")
    p.add_argument("--every", type=float, default=10.0, help="minutes between the compared points")
    p.add_argument("--png", default="", help="also draw the held-out curves by wall minute here")
    args = p.parse_args(argv)
    runs = {Path(r).name: eval_rows(r) for r in args.runs}
    empty = [name for name, rows in runs.items() if not rows]
    if empty:
        raise SystemExit(f"no held-out evaluation logged yet in {', '.join(empty)}")
    print(json.dumps(compare(runs, args.every), indent=1))
    if args.png:
        plot(runs, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
