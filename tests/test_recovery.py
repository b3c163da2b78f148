"""Recovery finetuning: distillation lowers the gap to the teacher, LoRA merges into plain weights, resume is exact,
NaN stops with the last good state, and the command line writes a verified checkpoint of the same format."""

import copy
import dataclasses
import hashlib
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from dms_llm import cli
from dms_llm import recovery as recovery_mod
from dms_llm.exporter import build_pruned_model
from dms_llm.recovery import FinetuneConfig, FinetuneError, finetune
from dms_llm.resources import count_parameters
from dms_llm.training import kl_divergence

from .conftest import nan_on_call, per_layer_structure, tiny_llama


@pytest.fixture
def windows():
    return torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def pair():
    dense = tiny_llama()
    return dense, build_pruned_model(dense, per_layer_structure(dense))


def _gap(student, teacher, ids):
    with torch.no_grad():
        return kl_divergence(student(input_ids=ids).logits, teacher(input_ids=ids).logits).item()


@pytest.mark.parametrize("lora", [False, True])
def test_distillation_closes_the_gap_and_keeps_the_structure(pair, windows, lora):
    dense, pruned = pair
    before, n_params = _gap(pruned, dense, windows), count_parameters(pruned)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    config = FinetuneConfig(tokens=30 * 4 * 32, lora=lora, lr=5e-3 if lora else 1e-3)
    result = finetune(pruned, windows, config, teacher=dense, progress=False)
    assert result.steps_run == 30 and result.tokens_seen == 30 * 4 * 32 and len(result.history) == 30
    assert _gap(pruned, dense, windows) < 0.5 * before
    # LoRA is merged: plain Linear modules, the same tensors and parameter count as before
    assert all(type(m) is nn.Linear for n, m in pruned.named_modules() if n.endswith(("q_proj", "down_proj")))
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes and count_parameters(pruned) == n_params
    assert not any(p.requires_grad for p in pruned.parameters()) and not pruned.training


def test_interrupted_run_resumes_to_the_same_weights(pair, windows, tmp_path):
    dense, pruned = pair
    config = FinetuneConfig(tokens=12 * 2 * 32, batch_size=2, lr=1e-3, lora=True, lora_rank=4,
                            checkpoint_path=str(tmp_path / "state.pt"), checkpoint_every=5)
    straight = copy.deepcopy(pruned)
    finetune(straight, windows, dataclasses.replace(config, checkpoint_path=None), teacher=dense, progress=False)

    interrupted, calls = copy.deepcopy(pruned), {"n": 0}

    def ctrl_c_at_step_8(module, args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt

    handle = interrupted.register_forward_pre_hook(ctrl_c_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, windows, config, teacher=dense, progress=False)
    handle.remove()
    assert torch.load(tmp_path / "state.pt", weights_only=False)["step"] == 7
    # the adapters are gone again: the interrupted model is the model that was given
    assert all(type(m) is nn.Linear for n, m in interrupted.named_modules() if n.endswith("q_proj"))
    result = finetune(interrupted, windows, dataclasses.replace(config, resume=True), teacher=dense, progress=False)
    assert result.steps_run == 12
    for (name, a), b in zip(straight.state_dict().items(), interrupted.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_nan_loss_stops_and_keeps_the_last_good_state(pair, windows, tmp_path, monkeypatch):
    dense, pruned = pair
    monkeypatch.setattr(recovery_mod, "next_token_loss", nan_on_call(recovery_mod.next_token_loss, 3))
    config = FinetuneConfig(tokens=10 * 4 * 32, lr=1e-3, checkpoint_path=str(tmp_path / "s.pt"))
    with pytest.raises(FloatingPointError, match="at step 3.*state after step 2"):
        finetune(pruned, windows, config, teacher=dense, progress=False)
    state = torch.load(tmp_path / "s.pt", weights_only=False)
    assert state["step"] == 2 and len(state["history"]) == 2
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())


@pytest.mark.parametrize("change, message", [
    (dict(tokens=8), "less than one window"),
    (dict(batch_size=99), "`batch_size` must be"),
    (dict(kl_weight=0.0, lm_loss_weight=0.0), "nothing to train"),
])
def test_bad_settings_are_refused(pair, windows, change, message):
    dense, pruned = pair
    with pytest.raises(FinetuneError, match=message):
        finetune(pruned, windows, FinetuneConfig(**change), teacher=dense, progress=False)


def test_teacher_with_another_vocabulary_is_refused(pair, windows):
    _, pruned = pair
    other = tiny_llama()
    other.resize_token_embeddings(200)
    with pytest.raises(FinetuneError, match="vocabulary"):
        finetune(pruned, windows, FinetuneConfig(), teacher=other, progress=False)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_finetune_command_writes_a_verified_per_layer_checkpoint(pruned_folder, dense_folder, text_file, tmp_path):
    before = _digest(pruned_folder)
    out = tmp_path / "recovered"
    code = cli.main(["finetune", str(pruned_folder), "--trust-remote-code", "--teacher", str(dense_folder),
                     "--calib", str(text_file), "--tokens", "4096", "--seq-len", "64", "--batch-size", "4", "--lora",
                     "--lora-rank", "4", "--lr", "3e-3", "--out", str(out), "--eval-data", str(text_file),
                     "--eval-seq-len", "64", "--eval-windows", "4", "--quiet"])
    assert code == 0
    assert _digest(pruned_folder) == before  # the input export is never modified
    names = {p.name for p in out.iterdir()}
    assert {"configuration_dms_llama.py", "modeling_dms_llama.py", "model.safetensors", "dms_structure.json",
            "dms_structure.png", "README.md", "dms_recovery_log.jsonl", "tokenizer.json"} <= names
    info = json.loads((out / "dms_structure.json").read_text())
    rec = info["recovery"]
    assert rec["teacher"] == str(dense_folder) and rec["lora"] and rec["steps"] == 16 and rec["tokens_seen"] == 4096
    assert info["perplexity"]["recovered"]["ppl"] < info["perplexity"]["pruned"]["ppl"]
    assert info["structure"] == json.loads((pruned_folder / "dms_structure.json").read_text())["structure"]
    card = (out / "README.md").read_text()
    assert "- distillation" in card and "- lora" in card and "dms-llm finetune" in card and "| recovered |" in card
    original = AutoModelForCausalLM.from_pretrained(pruned_folder, trust_remote_code=True)
    recovered = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert count_parameters(recovered) == count_parameters(original)
    assert not torch.equal(recovered.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    assert not list(tmp_path.glob(".*"))  # no temporary folder or recovery state left behind


def _finetune_cli(*args):
    return cli.main(["finetune", *map(str, args), "--quiet"])


def test_finetune_command_refuses_bad_inputs_before_training(pruned_folder, dense_folder, text_file, tmp_path, capsys):
    cases = [
        ((dense_folder, "--out", tmp_path / "o1", "--teacher", dense_folder), "no dms_structure.json"),
        ((pruned_folder, "--out", pruned_folder / "sub", "--teacher", dense_folder, "--trust-remote-code"),
         "source folder"),
        ((pruned_folder, "--out", tmp_path / "o2", "--teacher", dense_folder, "--tokens", "10", "--seq-len", "64"),
         "less than one window"),
        ((pruned_folder, "--out", tmp_path / "o3", "--teacher", dense_folder, "--calib", tmp_path / "missing.txt",
          "--trust-remote-code"), "missing.txt"),
        ((pruned_folder, "--out", tmp_path / "o5", "--teacher", dense_folder), "trust-remote-code"),
    ]
    for args, message in cases:
        calib = () if "--calib" in args else ("--calib", text_file)
        assert _finetune_cli(*args, *calib) == 2
        err = capsys.readouterr().err
        assert message in err, (args, err)


def test_user_flow_prune_joint_finetune_push(dense_folder, text_file, tmp_path, capsys):
    """prune --joint --uniform -> finetune -> push --dry-run on a local checkpoint, as a user runs them."""
    pruned, recovered = tmp_path / "p", tmp_path / "r"
    common = ["--calib", str(text_file), "--eval-data", str(text_file), "--eval-seq-len", "64", "--eval-windows", "2",
              "--quiet"]
    assert cli.main(["prune", str(dense_folder), "--keep", "0.7", "--joint", "--joint-lr", "1e-2", "--lora-rank", "4",
                     "--uniform", "--steps", "4", "--seq-len", "32", "--num-samples", "8", "--out", str(pruned),
                     *common]) == 0
    info = json.loads((pruned / "dms_structure.json").read_text())
    assert info["search"]["config"]["joint"] and info["params_after"] <= 0.7 * info["params_before"]
    assert "Joint search: LoRA adapters (rank 4)" in (pruned / "README.md").read_text()
    assert cli.main(["finetune", str(pruned), "--tokens", "1024", "--seq-len", "64",
                     "--out", str(recovered), *common]) == 0  # teacher: the base model the export records
    assert json.loads((recovered / "dms_structure.json").read_text())["recovery"]["teacher"] == str(dense_folder)
    assert type(LlamaForCausalLM.from_pretrained(recovered)) is LlamaForCausalLM  # uniform stays a stock checkpoint
    assert not (recovered / "modeling_dms_llama.py").exists()
    capsys.readouterr()
    assert cli.main(["push", str(recovered), "--repo", "me/tiny", "--dry-run", str(tmp_path / "stage")]) == 0
    assert "dms_recovery_log.jsonl" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_recovery_is_finite(pair, windows, precision):
    dense, pruned = pair
    result = finetune(pruned, windows, FinetuneConfig(tokens=4 * 4 * 32, lr=1e-3, mixed_precision=precision),
                      teacher=dense, progress=False)
    assert all(torch.isfinite(torch.tensor([h["loss"], h["kl"], h["grad_norm"]])).all() for h in result.history)
    assert all(torch.isfinite(p).all() for p in pruned.parameters())
