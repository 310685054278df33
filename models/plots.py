"""The loss-curve PNG of a training run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average, so the curve at step s only uses steps <= s."""
    if len(values) < 2 or window <= 1:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    n = np.minimum(np.arange(1, len(values) + 1), window)
    return (c[1:] - c[np.arange(1, len(values) + 1) - n]) / n


def plot_losses(rows: list[dict[str, Any]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        steps, losses = map(np.asarray, zip(*train))
        ax.plot(steps, losses, color="0.8", lw=0.6, label="train (per step)")
        ax.plot(steps, _smooth(losses, max(1, len(losses) // 50)), color="C0", lw=1.5, label="train (smoothed)")
    for i, name in enumerate(("valid_perf", "valid_score")):
        pts = [(r["step"], r[name]) for r in rows if name in r]
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{i + 1}", ms=3, label=f"{name} (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def plot_call_answer_truth(call, answer, truth, call_s: float, path: str | Path, title: str = "") -> None:
    """Two piano rolls over one time axis: the call and antiphon's answer above, the call and what
    the player really played next below (codec.Note lists; answer and truth start at call_s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (("antiphon", answer, "C1"), ("the player's own continuation", truth, "C2"))
    pitches = [n.pitch for part in (call, answer, truth) for n in part] or [60]
    end = max([call_s] + [call_s + n.end for part in (answer, truth) for n in part])
    fig, axes = plt.subplots(2, 1, figsize=(12, 6), dpi=100, sharex=True, sharey=True)
    for ax, (name, notes, colour) in zip(axes, rows):
        for n in call:
            ax.barh(n.pitch, n.end - n.start, left=n.start, height=0.8, color="C0", alpha=0.3 + 0.7 * n.velocity / 127)
        for n in notes:
            ax.barh(n.pitch, n.end - n.start, left=call_s + n.start, height=0.8, color=colour,
                    alpha=0.3 + 0.7 * n.velocity / 127)
        ax.axvline(call_s, color="0.3", lw=0.8, ls="--")
        ax.set_ylabel("MIDI pitch")
        ax.set_title(f"call (blue), then {name}", loc="left", fontsize=10)
        ax.grid(alpha=0.2)
    axes[0].set_ylim(min(pitches) - 2, max(pitches) + 2)
    axes[1].set_xlim(0, end)
    axes[1].set_xlabel("seconds (opacity: velocity)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
