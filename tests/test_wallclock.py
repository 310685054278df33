"""Runs compared at equal wall time (models/wallclock.py)."""

from __future__ import annotations

import json

import pytest

from antiphon.models import wallclock as W


def write_run(folder, evals):
    folder.mkdir()
    rows = [{"step": 1, "train_loss": 5.0, "tokens_per_s": 1000.0}]  # training rows are not evaluations
    rows += [{"step": s, "valid_perf": p, "valid_score": q, "wall_s": t} for s, t, p, q in evals]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_losses_are_read_at_common_minutes_up_to_the_shortest_run(tmp_path, capsys):
    small = write_run(tmp_path / "small", [(0, 0.0, 6.0, 6.0), (400, 600.0, 4.0, 2.0), (800, 1200.0, 3.0, 1.0)])
    big = write_run(tmp_path / "big", [(0, 0.0, 6.0, 6.0), (150, 900.0, 3.5, 1.5)])
    out = W.compare({"small": W.eval_rows(small), "big": W.eval_rows(big)}, every_min=5.0)
    assert out["small"]["end"] == {"minutes": 20.0, "step": 800, "valid_perf": 3.0, "valid_score": 1.0}
    # 15 minutes is the big run's end: both are read there, the small one between its evaluations
    assert list(out["small"]["at_minutes"]) == ["5.0", "10.0", "15.0"]
    assert out["small"]["at_minutes"]["15.0"]["valid_perf"] == pytest.approx(3.5)
    assert out["big"]["at_minutes"]["5.0"]["valid_perf"] == pytest.approx(6.0 - 2.5 / 3, abs=1e-4)  # rounded to 4 places
    assert W.at_minutes(W.eval_rows(big), 16.0, "valid_perf") is None
    assert W.main([str(small), str(big), "--png", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert json.loads(capsys.readouterr().out)["big"]["end"]["step"] == 150


def test_a_run_without_evaluations_is_named(tmp_path):
    empty = write_run(tmp_path / "empty", [])
    with pytest.raises(SystemExit, match="empty"):
        W.main([str(empty)])
