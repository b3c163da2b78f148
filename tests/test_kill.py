"""Real SIGKILLs: a killed search resumes to the uninterrupted result; a killed export leaves the old output."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

SEARCH = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama
    from dms_llm.search import PruneConfig, prune
    model = tiny_llama()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(keep=0.6, steps=300, warmup_steps=1, batch_size=2, seed=1, patience=10_000,
                      checkpoint_every=2, checkpoint_path=sys.argv[1] or None, resume=sys.argv[2] == "resume")
    result = prune(model, calib, cfg, progress=False)
    log = [{{k: v for k, v in h.items() if k != "seconds"}} for h in result.history]  # wall-clock times differ
    print(json.dumps({{"structure": result.structure.to_dict(), "history": log}}))
    """
)

EXPORT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama
    import dms_llm.exporter as exporter
    from dms_llm.structure import ModelShape, Structure
    model = tiny_llama()
    real_verify = exporter._verify
    def slow_verify(*args, **kwargs):
        print("writing", flush=True)
        time.sleep(60)
        return real_verify(*args, **kwargs)
    exporter._verify = slow_verify
    exporter.export(model, Structure.dense(ModelShape.from_model(model)), sys.argv[1], overwrite=True)
    """
)


def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text.format(tests=os.path.dirname(__file__)))
    return str(path)


def test_sigkilled_search_resumes_to_the_same_result(tmp_path):
    script = _script(tmp_path, "search.py", SEARCH)
    full = subprocess.run([sys.executable, script, "", "fresh"], capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    ckpt = tmp_path / "state.pt"
    proc = subprocess.Popen([sys.executable, script, str(ckpt), "fresh"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search finished before it could be killed"
    resumed = subprocess.run([sys.executable, script, str(ckpt), "resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = json.loads(full.stdout), json.loads(resumed.stdout)
    assert a["structure"] == b["structure"] and a["history"] == b["history"]


def test_sigkilled_export_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    script = _script(tmp_path, "export.py", EXPORT)
    proc = subprocess.Popen([sys.executable, script, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # weights written to the temporary folder, not yet verified
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    stale = list(tmp_path.glob(".out.tmp-*"))
    assert len(stale) == 1 and (stale[0] / "model.safetensors").exists()  # beside the target, never in it
    # the next export into the same place cleans up what the killed one left
    from dms_llm.exporter import export
    from dms_llm.structure import ModelShape, Structure

    from .conftest import tiny_llama

    model = tiny_llama()
    export(model, Structure.dense(ModelShape.from_model(model)), out, overwrite=True)
    assert not list(tmp_path.glob(".out.tmp-*")) and (out / "model.safetensors").exists()


def test_sigterm_during_finetune_saves_and_resume_ends_with_the_same_weights(tmp_path, pruned_folder, dense_folder,
                                                                          text_file):
    """A scheduler's SIGTERM to `dms-llm finetune` saves the state like Ctrl-C (exit 130); `--resume` then ends
    with exactly the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    def command(out, *extra):
        return [sys.executable, "-m", "dms_llm", "finetune", str(pruned_folder), "--trust-remote-code", "--teacher",
                str(dense_folder), "--calib", str(text_file), "--tokens", str(400 * 2 * 32), "--seq-len", "32",
                "--batch-size", "2", "--lr", "1e-3", "--no-eval", "--out", str(out), *extra]

    straight = subprocess.run(command(tmp_path / "a"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "b"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until the training loop runs
        if "step 20/400" in line:
            break
    os.kill(proc.pid, signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, rest[-2000:]
    state = tmp_path / ".b.recovery-state.pt"
    assert state.exists() and "continue with --resume" in rest and not out.exists()
    resumed = subprocess.run(command(out, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()
