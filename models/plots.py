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
