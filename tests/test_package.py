"""Packaging and import-graph rules: namespaced imports, a torch-free daemon, one CLI."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import antiphon.daemon

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str) -> subprocess.CompletedProcess:
    # Run outside the repo root so that `import daemon` could not resolve to the folder.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120, check=False)


def test_every_daemon_module_imports_without_torch():
    names = sorted(m.name.removeprefix("antiphon.daemon.") for m in
                   pkgutil.walk_packages(antiphon.daemon.__path__, "antiphon.daemon.") if not m.name.endswith("__main__"))
    assert {"vocab", "codec", "config", "cli", "offline.render", "rigs.jackserver"} <= set(names)
    code = ("import importlib, json, sys\n"
            f"for n in {names!r}: importlib.import_module('antiphon.daemon.' + n)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxscript'))))")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_help_ports_and_jam_parsing_never_import_torch():
    code = ("import sys\nfrom antiphon.daemon import cli\n"
            "for argv in (['--help'], ['ports', '--help'], ['jam', '--help']):\n"
            "    try: cli.main(argv)\n"
            "    except SystemExit: pass\n"
            "print('torch' in sys.modules)")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"
    for sub in ("jam", "ports", "tokenize", "data", "train", "eval", "export", "bench", "continue", "render", "tune",
                "demo"):
        assert f"    {sub}" in proc.stdout


def test_every_subcommand_prints_its_help():
    # Config help is written for people ("±10 %"); argparse would read a bare % as a format.
    code = ("from antiphon.daemon import cli\n"
            "for name in cli.COMMANDS:\n"
            "    try: cli.main([name, '--help'])\n"
            "    except SystemExit as e: assert e.code == 0, name\n")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert "--perf-share" in proc.stdout and "±10 %" in proc.stdout


def test_python_dash_m_runs_the_same_cli():
    for module in ("antiphon", "antiphon.daemon"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd="/",
                              timeout=60, check=False)
        assert proc.returncode == 0 and "tokenize" in proc.stdout, proc.stderr


def test_no_top_level_daemon_models_or_export_is_installed():
    proc = run_py("import importlib.util as u; print([n for n in ('daemon', 'models', 'export') if u.find_spec(n)])")
    assert proc.stdout.strip() == "[]", proc.stdout


def test_vocab_table_prints_every_range():
    proc = subprocess.run([sys.executable, "-m", "antiphon.daemon.vocab"], capture_output=True, text=True, cwd="/", check=False)
    assert proc.returncode == 0
    for name in ("NOTE_ON", "NOTE_OFF", "TIME_SHIFT", "VELOCITY", "SUSTAIN_ON", "SUSTAIN_OFF", "PAD", "BOS", "EOS"):
        assert name in proc.stdout
    assert "393 tokens" in proc.stdout


def test_tokenize_command_round_trips_a_real_performance(tmp_path):
    src = ROOT / "tests" / "data" / "satie_gymnopedie1_hannds.mid"
    out = tmp_path / "seen.mid"
    proc = subprocess.run([sys.executable, "-m", "antiphon", "tokenize", str(src), "-o", str(out), "--json"],
                          capture_output=True, text=True, cwd="/", timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["notes"] == stats["output_notes"] == 456
    assert stats["tokens"] > 2 * stats["notes"] and out.stat().st_size > 1000


def test_tokenize_rejects_a_non_midi_file_clearly(tmp_path):
    bad = tmp_path / "notes.mid"
    bad.write_text("this is not MIDI")
    proc = subprocess.run([sys.executable, "-m", "antiphon", "tokenize", str(bad)], capture_output=True, text=True,
                          cwd="/", timeout=60, check=False)
    assert proc.returncode == 2
    assert "notes.mid" in proc.stderr and "Traceback" not in proc.stderr


def test_jam_flags_and_their_short_aliases_fill_the_config(tmp_path):
    from antiphon.daemon import cli
    from antiphon.daemon.config import JamConfig

    cfg_file = tmp_path / "jam.json"
    cfg_file.write_text('{"JamConfig": {"temperature": 0.5, "wait_ms": 900}}')
    args = cli.build_parser().parse_args(["jam", "--config", str(cfg_file), "--in", "Keystation", "--out", "2",
                                    "--wait", "250", "--follow-density", "0"])
    (cfg,) = cli.configs(args, JamConfig)
    assert (cfg.in_port, cfg.out_port, cfg.wait_ms, cfg.follow_density) == ("Keystation", "2", 250, 0.0)
    assert cfg.temperature == 0.5  # from the file; the flag beat the file's wait_ms
