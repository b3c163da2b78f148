"""scripts/benchmark.py as the project runs it for the seed spread: rows appended as they finish, a second run of
the same protocol skips them, several seeds give a median and a spread."""

import json
import subprocess
import sys
from pathlib import Path

from dms_llm import search

ROOT = Path(__file__).resolve().parents[1]


def _run(folder, text, out, *extra):
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", str(folder), "--keeps", "0.8",
           "--methods", "dms_uniform", "random_uniform", "--steps", "2", "--seq-len", "32", "--num-samples", "8",
           "--recon-samples", "4", "--repair-check", "0", "--windows", "1", "--calib", str(text), "--eval-data",
           str(text), "--cache-dir", str(out / "cache"), "--out-dir", str(out), "--markdown", str(out / "B.md"),
           "--tag=-test", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_seed_runner_appends_skips_and_reports_the_spread(dense_folder, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    out = tmp_path / "bench"
    out.mkdir()
    _run(dense_folder, text, out, "--seeds", "0", "1")
    rows = json.loads((out / "results-test.json").read_text())
    keys = sorted((r["method"], r.get("seed")) for r in rows)
    assert keys == sorted([("dense", None), ("random_uniform", None), ("dms_uniform", 0), ("dms_uniform", 1),
                           ("dms_uniform+recon", 0), ("dms_uniform+recon", 1)])
    again = _run(dense_folder, text, out, "--seeds", "0", "1", "2")  # only seed 2 is new
    rows2 = json.loads((out / "results-test.json").read_text())
    assert len(rows2) == len(rows) + 2 and sum("seed 2" in line for line in again.splitlines()) == 2
    assert not any("seed 0" in line or "seed 1" in line for line in again.splitlines())
    table = (out / "B.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| dms_uniform+recon | 0.8 |"))
    assert "| 0, 1, 2 |" in row


def test_a_search_option_reaches_every_dms_search_and_its_protocol(dense_folder, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    out = tmp_path / "bench"
    out.mkdir()
    _run(dense_folder, text, out, "--search-option", "batch_size=2", "--search-option", "lr=0.05")
    rows = json.loads((out / "results-test.json").read_text())
    # with the in-search repair as the library resolves it (on by default), so that its rows and cached structures
    # are never mixed with those of a search without it
    expected = {"batch_size": 2, "lr": 0.05, "repair_every": search.REPAIR_EVERY, "repair_takeover": False}
    assert all(r["protocol"]["search_options"] == expected for r in rows)
    cached = [p.name for p in (out / "cache").iterdir() if p.name.startswith("dms_uniform")]
    assert cached and all("-batch_size2-lr0.05" in name for name in cached)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--search-option", "batchsize=2"],
                          capture_output=True, text=True, timeout=120, cwd=out)
    assert proc.returncode != 0 and "PruneConfig field" in proc.stderr
