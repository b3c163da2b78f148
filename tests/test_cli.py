"""The command line as a user runs it: the embedded SmolLM2-135M end to end (integration, short sequences) and
tiny local checkpoints (interrupt and resume, error messages in flags)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dms_llm.resources import count_parameters

integration = pytest.mark.integration
# the depth check after the repair scores every candidate on held-out windows (by default 4 x 2048 tokens, minutes on
# two cores); short windows keep these runs short and still take that path
SHORT_REPAIR_CHECK = ("--repair-check", "2", "--repair-check-len", "128")


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "dms_llm", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _generate(folder, trust_remote_code):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert isinstance(tok.decode(out[0, ids.shape[1]:]), str)
    return model


@pytest.fixture(scope="module")
def calib_file():
    """Real English text that every machine has: the built-in calibration source (CPython's pydoc topics)."""
    return "pydoc"


@integration
def test_prune_per_layer_end_to_end(tmp_path, calib_file):
    out = tmp_path / "OUT"
    proc = _run("prune", "smollm2-135m", "--keep", "0.8", "--calib", calib_file, "--steps", "5", "--seq-len", "128",
                "--num-samples", "8", "--out", str(out), "--eval-data", "pydoc-heldout", "--eval-windows", "1",
                "--eval-seq-len", "256", "--quiet", "--format", "per-layer", *SHORT_REPAIR_CHECK)
    assert "| parameters" in proc.stdout and "| perplexity" in proc.stdout and "search time" in proc.stdout
    model = _generate(out, trust_remote_code=True)
    assert count_parameters(model) <= 0.81 * 134_515_008
    info = json.loads((out / "dms_structure.json").read_text())
    assert info["params_after"] == count_parameters(model) and info["params_before"] == 134_515_008
    assert info["embedding_params"] == 49_152 * 576  # tied: counted once
    assert "|   without embeddings" in proc.stdout
    assert (out / "dms_structure.png").exists() and (out / "dms_search_log.jsonl").exists()
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "- pruned" in card
    assert "| pruned |" in card and "trust_remote_code=True" in card and "dms-llm prune smollm2-135m" in card
    assert "of those outside the embeddings" in card
    assert not list(tmp_path.glob(".*"))  # no temporary folders or search state left behind
    # zero-shot on the export, offline, with the built-in example task
    proc = _run("eval", str(out), "--trust-remote-code", "--tasks", "dms_example", "--limit", "8", "--json",
                str(tmp_path / "zs.json"), "--request-cache", str(tmp_path / "answers"))
    assert "dms_example" in proc.stdout and "acc" in proc.stdout
    zs = json.loads((tmp_path / "zs.json").read_text())["zero_shot"]["dms_example"]
    assert 0 <= zs["value"] <= 1 and zs["stderr"] is not None and zs["n"] == 8 and len(zs["scores"]) == 8
    assert len(list((tmp_path / "answers").glob("requests-*.db"))) == 1  # where a rerun resumes from


@integration
def test_prune_uniform_gives_stock_llama(tmp_path, calib_file):
    out = tmp_path / "U"
    _run("prune", "smollm2-135m", "--keep", "0.8", "--calib", calib_file, "--steps", "3", "--seq-len", "64",
         "--num-samples", "4", "--out", str(out), "--uniform", "--no-eval", "--quiet", *SHORT_REPAIR_CHECK)
    model = LlamaForCausalLM.from_pretrained(out)  # no custom code
    assert count_parameters(model) <= 0.8 * 134_515_008
    _generate(out, trust_remote_code=False)


@integration
def test_cli_rejects_bad_budget_before_loading_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dms_llm", "prune", "smollm2-135m", "--keep", "0.1", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "reachable range" in proc.stderr
    assert not (tmp_path / "x").exists()


@integration
def test_eval_command_on_gguf(tmp_path):
    proc = _run("eval", "smollm2-135m", "--eval-data", "pydoc-heldout", "--eval-windows", "1", "--eval-seq-len", "128",
                "--json", str(tmp_path / "r.json"))
    r = json.loads((tmp_path / "r.json").read_text())["perplexity"]
    assert 1 < r["ppl"] < 100 and r["windows"] == 1 and "perplexity" in proc.stdout
    torch.testing.assert_close(r["seq_len"], 128)


@integration
@pytest.mark.parametrize("keep", ["0", "1", "-0.5"])
def test_cli_rejects_keep_out_of_range_at_once(tmp_path, keep):
    proc = subprocess.run([sys.executable, "-m", "dms_llm", "prune", "smollm2-135m", f"--keep={keep}", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "strictly between 0 and 1" in proc.stderr


@integration
def test_bf16_search_on_smollm2_stays_finite(tmp_path, calib_file):
    import math

    out = tmp_path / "bf16"
    _run("prune", "smollm2-135m", "--keep", "0.8", "--calib", calib_file, "--steps", "5", "--seq-len", "64",
         "--num-samples", "4", "--out", str(out), "--no-eval", "--quiet", "--mixed-precision", "bf16",
         *SHORT_REPAIR_CHECK)
    log = [json.loads(line) for line in (out / "dms_search_log.jsonl").read_text().splitlines()]
    assert len(log) == 5 and all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in log)


@integration
def test_bf16_recovery_on_smollm2_stays_finite(calib_file):
    """Distillation in bf16 autocast (fp32 KL softmax, fp32 master weights) gives finite losses on the real model."""
    import dms_llm
    from dms_llm.recovery import FinetuneConfig, finetune
    from dms_llm.structure import ModelShape, Structure

    dense, tok, _ = dms_llm.load_model("smollm2-135m")
    structure = Structure.dense(ModelShape.from_model(dense))
    for i in (5, 9, 13):
        structure.layers[i].kv_heads, structure.layers[i].channels = [], []
    structure.layers[20].channels = structure.layers[20].channels[:512]
    pruned = dms_llm.build_pruned_model(dense, structure)
    windows = dms_llm.calibration_windows(tok, calib_file, 64, 4)
    result = finetune(pruned, windows, FinetuneConfig(tokens=3 * 2 * 64, batch_size=2, mixed_precision="bf16"),
                      teacher=dense, progress=False)
    assert result.steps_run == 3
    assert all(torch.isfinite(torch.tensor([h["loss"], h["kl"], h["grad_norm"]])).all() for h in result.history)
    assert all(torch.isfinite(p).all() for p in pruned.parameters())


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
    for line in proc.stdout:  # wait until the training loop runs (its first step is logged)
        if "step 1/400" in line:
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
