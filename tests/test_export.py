"""Checkpoint format, ONNX export contract and verification (uses the session's tiny model)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from antiphon.daemon import vocab as V
from antiphon.daemon.cli import main as cli_main
from antiphon.export import verify as vf
from antiphon.export.onnx_export import export_model, io_names, read_metadata, set_metadata
from antiphon.export.quantize import convert_fp16
from antiphon.models.checkpoint import CheckpointError, load_model, save_checkpoint


def test_checkpoint_round_trip_is_weights_only(tiny_model, tmp_path):
    data = torch.load(tiny_model.checkpoint, weights_only=True)
    assert data["run_id"] == "tiny-test" and data["step"] == 60
    assert data["vocab_size"] == V.VOCAB_SIZE and data["model_config"]["d_model"] == 64
    model, cfg, meta = load_model(tiny_model.checkpoint)
    assert cfg == tiny_model.cfg and "model" not in meta
    ids = torch.tensor([tiny_model.tokens[:50]])
    with torch.no_grad():
        assert torch.equal(model(ids)[0], tiny_model.model(ids)[0])
    save_checkpoint(tmp_path / "again.pt", model, cfg, {"run_id": meta["run_id"]})
    assert not list(tmp_path.glob("*.tmp")), "atomic write leaves no temporary file"


def test_checkpoint_with_other_vocabulary_is_refused(tiny_model, tmp_path):
    data = torch.load(tiny_model.checkpoint, weights_only=True)
    data["vocab"] = {**data["vocab"], "velocity_bins": 16}
    torch.save(data, tmp_path / "other.pt")
    with pytest.raises(V.VocabMismatch, match="velocity_bins"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")


def test_graph_contract_and_metadata(tiny_model):
    proto = onnx.load(str(tiny_model.onnx))
    names_in, names_out = io_names(2)
    assert [i.name for i in proto.graph.input] == names_in == [
        "input_ids", "seqlens_k", "total_sequence_length", "past.0.key", "past.0.value", "past.1.key", "past.1.value"]
    assert [o.name for o in proto.graph.output] == names_out
    past = [d.dim_param or d.dim_value for d in proto.graph.input[3].type.tensor_type.shape.dim]
    assert past[0] == 1 and past[1] == 2 and isinstance(past[2], str) and past[3] == 32
    assert sum(n.op_type == "GroupQueryAttention" for n in proto.graph.node) == 2
    meta = read_metadata(proto)
    assert json.loads(meta["vocab"]) == json.loads(V.metadata()["vocab"])
    assert int(meta["vocab_size"]) == V.VOCAB_SIZE and meta["run_id"] == "tiny-test"
    assert json.loads(meta["model_config"])["n_layer"] == 2 and meta["precision"] == "fp32"
    assert meta["kv_layout"] == "gqa/bhsd-v1"


def test_portable_layout_exports_gpt_forward_and_verifies(tiny_model, tmp_path):
    path = export_model(tiny_model.model, tiny_model.cfg, tmp_path / "portable.onnx", "tiny-test", layout="portable")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input][:2] == ["input_ids", "past.0.key"]
    assert [o.name for o in proto.graph.output][:2] == ["logits", "new.0.key"]
    assert not any(n.domain == "com.microsoft" for n in proto.graph.node)
    report = vf.verify(str(path), tiny_model.model, tiny_model.cfg, tiny_model.tokens, greedy_steps=64,
                       log=lambda s: None)
    assert report.max_abs_diff <= 1e-4 and report.greedy_steps == 64


def test_fp32_export_matches_torch_and_greedy_is_identical(tiny_model):
    report = tiny_model.report
    assert report.max_abs_diff <= 1e-4 and report.cached_max_abs_diff <= 1e-4
    assert report.greedy_steps == 256 and report.top1_agreement >= 0.99
    # 32 prompt + 256 steps overflows the 128-token context: sliding was exercised on both sides.
    assert 32 + report.greedy_steps > tiny_model.cfg.context


def test_tampered_weights_fail_with_a_typed_error(tiny_model, tmp_path):
    proto = onnx.load(str(tiny_model.onnx))
    big = max(proto.graph.initializer, key=lambda t: len(t.raw_data) if t.raw_data else 0)
    arr = onnx.numpy_helper.to_array(big).copy()
    arr.flat[::7] += 0.05
    big.CopyFrom(onnx.numpy_helper.from_array(arr, big.name))
    onnx.save(proto, str(tmp_path / "tampered.onnx"))
    with pytest.raises(vf.LogitsMismatch, match=r"differ by .* at \("):
        vf.verify(str(tmp_path / "tampered.onnx"), tiny_model.model, tiny_model.cfg, tiny_model.tokens,
                  log=lambda s: None)


def test_metadata_from_another_checkpoint_fails_signature(tiny_model, tmp_path):
    proto = onnx.load(str(tiny_model.onnx))
    cfg = json.loads(read_metadata(proto)["model_config"])
    set_metadata(proto, {"model_config": json.dumps({**cfg, "rope_base": 500.0})})
    onnx.save(proto, str(tmp_path / "other.onnx"))
    with pytest.raises(vf.SignatureMismatch, match="model_config"):
        vf.verify(str(tmp_path / "other.onnx"), tiny_model.model, tiny_model.cfg, tiny_model.tokens)


def test_int8_agrees_with_fp32(tiny_model):
    report = vf.verify(str(tiny_model.int8), tiny_model.model, tiny_model.cfg, tiny_model.tokens, "int8",
                       fp32_path=str(tiny_model.onnx), log=lambda s: None)
    assert report.top1_agreement >= 0.95
    assert 0 < report.max_abs_diff < 1.0  # really quantized, and not broken
    assert tiny_model.int8.stat().st_size < 0.6 * tiny_model.onnx.stat().st_size


def test_fp16_runs_on_cpu_within_tolerance(tiny_model, tmp_path):
    path = convert_fp16(tiny_model.onnx, tmp_path / "tiny.fp16.onnx")
    report = vf.verify(str(path), tiny_model.model, tiny_model.cfg, tiny_model.tokens, "fp16",
                       log=lambda s: None)
    assert 0 < report.max_abs_diff <= vf.TOLERANCES["fp16"].logits_abs and report.top1_agreement >= 0.95
    assert read_metadata(onnx.load(str(path)))["precision"] == "fp16"


def test_cli_verify(tiny_model, capsys):
    assert cli_main(["export", "--verify", str(tiny_model.onnx), str(tiny_model.checkpoint)]) == 0
    assert "greedy 256 steps identical" in capsys.readouterr().out
    assert cli_main(["export", "--verify", str(tiny_model.onnx), str(tiny_model.onnx)]) == 2


def test_demo_tokens_are_real_codec_output():
    tokens = vf.demo_tokens(300)
    kinds = {V.kind(t) for t in tokens}
    assert {"NOTE_ON", "NOTE_OFF", "TIME_SHIFT", "VELOCITY", "SUSTAIN_ON"} <= kinds
    assert np.array_equal(tokens, vf.demo_tokens(300))


def test_bench_json_rows(tiny_model, capsys):
    args = ["bench", "--json", "--quick", "--checkpoint", str(tiny_model.checkpoint), "--model", str(tiny_model.onnx)]
    assert cli_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["decode"]
    engines = {"ort_kv", "ort_full", "torch_kv", "torch_full", "ort_int8_kv"}
    assert {(r["engine"], r["threads"], r["context"]) for r in rows} == {
        (e, t, c) for e in engines for t in (1, 2) for c in (64, 128)}
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert result["prefill_512_ms"] is None  # the tiny model's context is 128
    assert result["int8_model"] == str(tiny_model.int8)
    assert result["ratios"]["threads1_context128"]["ort_full/ort_kv"] > 0
