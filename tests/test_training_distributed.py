"""Data-parallel search: 2 CPU processes under accelerate give the structure of 1 process on the same global batch.

accelerate 1.15 runs `accelerate launch --cpu --num_processes 2` as ONE process unless mpirun is set up; two CPU
processes come from its torchrun path (`--multi_gpu`), which falls back to the gloo backend without CUDA."""

import json
import os
import shutil
import subprocess
import sys

import pytest

HELPER = os.path.join(os.path.dirname(__file__), "ddp_search.py")


def _one_and_two_processes(tmp_path, *extra, port=29517):
    single = subprocess.run([sys.executable, HELPER, str(tmp_path / "one.json"), "--batch-size", "2", *extra],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = shutil.which("accelerate") or "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                            HELPER, str(tmp_path / "two.json"), "--batch-size", "1", *extra],
                           capture_output=True, text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    return json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())


def test_two_process_search_equals_single_process(tmp_path):
    one, two = _one_and_two_processes(tmp_path)
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["hard"] == two["hard"]
    assert one["structure"] == two["structure"]


def test_two_process_fsdp_search_equals_single_process(tmp_path):
    """FSDP2 (frozen weights sharded per decoder layer over 2 gloo processes) finds what 1 process finds."""
    one, two = _one_and_two_processes(tmp_path, "--fsdp", port=29521)
    assert one["processes"] == 1 and two["processes"] == 2 and two["sharded"] and not one["sharded"]
    assert one["hard"] == two["hard"]
    assert one["structure"] == two["structure"]


def test_two_process_finetune_equals_single_process(tmp_path):
    one, two = _one_and_two_processes(tmp_path, "--finetune", port=29519)
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-4)
    for name, weights in one["weights"].items():
        assert weights == pytest.approx(two["weights"][name], abs=1e-5), name


@pytest.mark.parametrize("extra, port", [([], 29518), (["--fsdp"], 29520)])
def test_cli_under_two_processes_writes_once(tmp_path, extra, port):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(port), "-m", "dms_llm", "prune", "smollm2-135m", "--keep", "0.8",
                           "--calib", "pydoc", "--steps", "2", "--seq-len", "64", "--num-samples", "4",
                           "--out", str(out), "--no-eval", "--quiet", "--repair-check", "2", "--repair-check-len",
                           "128", *extra],  # short held-out windows: the depth check after the repair stays quick
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("DMS prune of") == 1
    info = json.loads((out / "dms_structure.json").read_text())
    assert info["params_after"] <= 0.8 * info["params_before"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
