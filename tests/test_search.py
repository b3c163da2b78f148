from pathlib import Path

import pytest
import torch

from dms_llm.errors import DMSError
from dms_llm.resources import ResourceModel
from dms_llm.search import BudgetError, PruneConfig, prune
from dms_llm.structure import ModelShape, Structure

from .conftest import nan_on_call


def _log(history):
    """The per-step search log without its wall-clock times."""
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("uniform", [False, True])
def test_search_meets_budget_and_leaves_model_unchanged(gqa_model, calib, uniform):
    before = _logits(gqa_model, calib[:1])
    cfg = PruneConfig(keep=0.7, steps=12, warmup_steps=2, batch_size=2, format="uniform" if uniform else "per-layer",
                      mlp_unit=8, patience=3)
    result = prune(gqa_model, calib, cfg, progress=False)
    shape = ModelShape.from_model(gqa_model)
    res = ResourceModel(shape)
    assert result.target_resource == int(0.7 * res.dense())
    assert result.pruned_resource == res.of_structure(result.structure) <= result.target_resource
    assert result.pruned_resource > 0.6 * res.dense()  # the unused budget is handed back
    result.structure.validate(shape)
    assert result.structure.is_uniform() == uniform or not uniform
    assert len(result.history) == result.steps_run and "kl" in result.history[0]
    assert torch.equal(_logits(gqa_model, calib[:1]), before)
    assert all(p.requires_grad for p in gqa_model.parameters())  # requires_grad restored


@pytest.mark.parametrize("uniform", [False, True])
def test_channels_are_ranked_one_by_one_and_widths_rounded_to_the_multiple(gqa_model, calib, uniform):
    cfg = PruneConfig(keep=0.6, steps=8, warmup_steps=2, batch_size=2, uniform=uniform, patience=3,
                      mlp_unit=1, channel_multiple=8)
    result = prune(gqa_model, calib, cfg, progress=False)
    widths = [len(layer.channels) for layer in result.structure.layers]
    assert all(w % 8 == 0 for w in widths) and any(0 < w < ModelShape.from_model(gqa_model).intermediate_size
                                                   for w in widths)
    assert result.pruned_resource <= result.target_resource
    # one-by-one ranking: some narrowed layer keeps a channel without the rest of its aligned group of 8
    full = ModelShape.from_model(gqa_model).intermediate_size
    narrowed = [set(layer.channels) for layer in result.structure.layers if 0 < len(layer.channels) < full]
    assert any(set(range(8 * (c // 8), 8 * (c // 8) + 8)) - kept for kept in narrowed for c in kept)


def test_search_is_reproducible_with_a_seed(gqa_model, calib):
    cfg = PruneConfig(keep=0.6, steps=6, warmup_steps=1, batch_size=2, seed=3)
    a = prune(gqa_model, calib, cfg, progress=False)
    b = prune(gqa_model, calib, cfg, progress=False)
    assert a.structure == b.structure


@pytest.mark.parametrize("search", ["per-layer", "uniform"])  # auto's two searches, each resumable
def test_search_resumes_to_the_same_structure(gqa_model, calib, tmp_path, monkeypatch, search):
    import dms_llm.training as training_mod
    from dms_llm.search import uniform_state_path

    base = dict(keep=0.6, steps=10, uniform_steps=10, warmup_steps=1, batch_size=2, seed=1, patience=100,
                checkpoint_every=4)
    full = prune(gqa_model, calib, PruneConfig(**base), progress=False)
    ckpt = tmp_path / "state.pt"
    real_batch = training_mod.batch_rows
    seen = {"n": 0}

    def interrupt_at_step_7(n, step, batch_size, seed):
        if step == 6:
            seen["n"] += 1
            if seen["n"] == (1 if search == "per-layer" else 2):
                raise KeyboardInterrupt
        return real_batch(n, step, batch_size, seed)

    monkeypatch.setattr(training_mod, "batch_rows", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        prune(gqa_model, calib, PruneConfig(**base, checkpoint_path=str(ckpt)), progress=False)
    uniform_ckpt = Path(uniform_state_path(str(ckpt)))
    if search == "per-layer":
        saved = torch.load(ckpt, weights_only=False)
        assert saved["step"] == 6 and not uniform_ckpt.exists()
        assert saved["repaired"] is not None  # the default in-search repair ran at step 6: the resume redoes it
    else:
        assert torch.load(ckpt, weights_only=False)["step"] == 10
        assert torch.load(uniform_ckpt, weights_only=False)["step"] == 6
    monkeypatch.setattr(training_mod, "batch_rows", real_batch)
    resumed = prune(gqa_model, calib, PruneConfig(**base, checkpoint_path=str(ckpt), resume=True), progress=False)
    assert resumed.steps_run == 10 and _log(resumed.history) == _log(full.history)
    assert resumed.uniform_steps_run == 10 and resumed.candidates == full.candidates
    assert resumed.structure == full.structure


@pytest.mark.parametrize("keep,match", [(0.0, "strictly between"), (1.0, "strictly between"), (1.5, "strictly"),
                                        (0.05, "reachable range")])
def test_budget_out_of_range_stops_early(gqa_model, calib, keep, match):
    with pytest.raises(BudgetError, match=match):
        prune(gqa_model, calib, PruneConfig(keep=keep, steps=1), progress=False)


def test_bad_search_inputs(gqa_model, calib):
    with pytest.raises(BudgetError, match="exactly one"):
        prune(gqa_model, calib, PruneConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        prune(gqa_model, calib + 1000, PruneConfig(keep=0.8, steps=1), progress=False)
    with pytest.raises(ValueError, match="mlp_unit"):
        prune(gqa_model, calib, PruneConfig(keep=0.8, steps=1, mlp_unit=7), progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_search_is_finite(gqa_model, calib, precision):
    cfg = PruneConfig(keep=0.7, steps=4, warmup_steps=1, batch_size=2, mixed_precision=precision)
    result = prune(gqa_model, calib, cfg, progress=False)
    assert all(torch.isfinite(torch.tensor([h["loss"], h["kl"]])).all() for h in result.history)
    assert result.met_budget


def _plain_linears(model):
    return all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj")))


def test_joint_search_merges_lora_and_exports_the_merged_weights(gqa_model, calib, tmp_path):
    from dms_llm.exporter import export

    before = {k: v.clone() for k, v in gqa_model.state_dict().items()}
    cfg = PruneConfig(keep=0.7, steps=8, warmup_steps=1, batch_size=2, joint=True, joint_lr=1e-2, lora_rank=4,
                      patience=100)
    result = prune(gqa_model, calib, cfg, progress=False)
    assert result.weights_updated and result.pruned_resource <= result.target_resource
    assert _plain_linears(gqa_model) and set(gqa_model.state_dict()) == set(before)
    changed = [k for k, v in gqa_model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith(("proj.weight")) for k in changed)  # only the adapted Linear weights moved
    exported = export(gqa_model, result.structure, tmp_path / "out")  # checks reload == hard-masked merged model
    assert exported.max_abs_diff <= 1e-3


def test_interrupted_joint_search_restores_the_model_and_resumes(gqa_model, calib, tmp_path, monkeypatch):
    import dms_llm.training as training_mod

    base = dict(keep=0.6, steps=8, warmup_steps=1, batch_size=2, seed=1, patience=100, checkpoint_every=3,
                joint=True, joint_lr=1e-2, lora_rank=4)
    original = {k: v.clone() for k, v in gqa_model.state_dict().items()}
    import copy

    straight_model = copy.deepcopy(gqa_model)
    full = prune(straight_model, calib, PruneConfig(**base), progress=False)
    ckpt, real_batch = tmp_path / "state.pt", training_mod.batch_rows

    def interrupt_at_step_6(n, step, batch_size, seed):
        if step == 5:
            raise KeyboardInterrupt
        return real_batch(n, step, batch_size, seed)

    monkeypatch.setattr(training_mod, "batch_rows", interrupt_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        prune(gqa_model, calib, PruneConfig(**base, checkpoint_path=str(ckpt)), progress=False)
    assert _plain_linears(gqa_model)
    assert all(torch.equal(v, original[k]) for k, v in gqa_model.state_dict().items())  # adapters dropped, unmerged
    assert torch.load(ckpt, weights_only=False)["lora"]
    monkeypatch.setattr(training_mod, "batch_rows", real_batch)
    resumed = prune(gqa_model, calib, PruneConfig(**base, checkpoint_path=str(ckpt), resume=True), progress=False)
    assert resumed.structure == full.structure and _log(resumed.history) == _log(full.history)
    final = torch.load(ckpt, weights_only=False)["lora"]  # saved before the merge: the adapters, not every weight
    assert final and all("lora_" in name for name in final)
    for (name, a), b in zip(straight_model.state_dict().items(), gqa_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_dispatched_model_is_searched_where_it_was_placed(gqa_model, calib, monkeypatch):
    """A model spread over devices with a device_map (one process) is never moved; token ids go to its
    embeddings' device, and the gate masks follow each activation's device."""
    from dms_llm.training import input_device, is_dispatched

    gqa_model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": torch.device("cpu"), "lm_head": "cpu"}
    assert is_dispatched(gqa_model) and input_device(gqa_model) == torch.device("cpu")

    def no_move(*args, **kwargs):
        raise AssertionError("a dispatched model must not be moved")

    monkeypatch.setattr(gqa_model, "to", no_move)
    result = prune(gqa_model, calib, PruneConfig(keep=0.7, steps=3, warmup_steps=1, batch_size=2), progress=False)
    assert result.pruned_resource <= result.target_resource


def test_nan_loss_stops_and_keeps_the_last_good_state(gqa_model, calib, tmp_path, monkeypatch):
    import dms_llm.search as search_mod

    monkeypatch.setattr(search_mod, "task_loss", nan_on_call(search_mod.task_loss, 3))
    ckpt = tmp_path / "state.pt"
    cfg = PruneConfig(keep=0.7, steps=10, warmup_steps=1, batch_size=2, checkpoint_path=str(ckpt))
    with pytest.raises(FloatingPointError, match="at step 3.*after step 2"):
        prune(gqa_model, calib, cfg, progress=False)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 2 and len(state["history"]) == 2
    assert all(torch.isfinite(v).all() for v in state["gates"].values() if v.is_floating_point())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in gqa_model.modules())


@pytest.mark.parametrize("uniform", [False, True])
def test_depth_candidates_spend_the_same_budget_with_fewer_removals(gqa_model, calib, uniform):
    from dms_llm.gates import DMSGates
    from dms_llm.search import depth_candidates

    shape = ModelShape.from_model(gqa_model)
    res = ResourceModel(shape)
    target = int(0.4 * res.dense())
    gates = DMSGates(gqa_model, uniform=uniform)
    with torch.no_grad():  # a searched state that removes blocks: the last layers least important
        for name, op in gates.operators.items():
            op.set_importance(torch.rand(op.rows, op.num_units, generator=torch.Generator().manual_seed(1)))
            op.ratio.fill_(0.5 if "depth" in name else 0.2)
    candidates = depth_candidates(gates, res, target)
    gates.remove()
    removed = [sum(r.values()) for r, _ in candidates]
    assert removed[0] > 0 and removed == sorted(removed, reverse=True) and removed[-1] == 0
    for r, structure in candidates:
        structure.validate(shape)
        assert res.of_structure(structure) <= target
        assert sum(not layer.kv_heads for layer in structure.layers) == r.get("attn_depth", r.get("layer_depth", 0))
        assert sum(not layer.channels for layer in structure.layers) == r.get("mlp_depth", r.get("layer_depth", 0))
        assert structure.is_uniform() or not uniform
    # fewer removed blocks leave the budget to the widths: the all-blocks candidate is the narrowest
    assert sum(map(len, (x.channels for x in candidates[-1][1].layers))) / shape.num_layers < \
        max(len(x.channels) for x in candidates[0][1].layers)


@pytest.mark.parametrize("uniform", [False, True])
def test_search_never_ends_worse_than_its_width_only_structure(gqa_model, calib, uniform):
    """At a small budget: the search's result scores no worse (its own calibration loss) than keeping every layer
    and narrowing them all — the candidate the depth check scores and a width-only search's structure."""
    from dms_llm.search import calibration_losses

    cfg = PruneConfig(keep=0.45, steps=16, warmup_steps=2, batch_size=2, format="uniform" if uniform else "per-layer",
                      patience=3, mixed_precision="no")  # fp32: the losses below are compared with the check's
    result = prune(gqa_model, calib, cfg, progress=False)
    checked = result.depth_check
    assert checked and sum(c["chosen"] for c in checked) == 1
    full = [c for c in checked if c["windows"] == len(calib[:cfg.depth_check])]  # the halving's finalists
    assert min(c["loss"] for c in full) == next(c["loss"] for c in checked if c["chosen"])
    assert sum(checked[-1]["removed"].values()) == 0  # the width-only candidate was scored
    width_only = prune(gqa_model, calib, PruneConfig(**{**cfg.__dict__, "search_depth": False}), progress=False)
    assert all(x.kv_heads and x.channels for x in width_only.structure.layers)
    assert width_only.depth_check == []  # nothing removed: nothing to check
    (ours, theirs), _ = calibration_losses(gqa_model, [result.structure, width_only.structure],
                                           calib[:cfg.depth_check])
    assert ours <= theirs + 1e-6
    off = prune(gqa_model, calib, PruneConfig(**{**cfg.__dict__, "depth_check": 0}), progress=False)
    assert off.depth_check == [] and off.pruned_resource <= off.target_resource


def test_depth_check_is_validated():
    with pytest.raises(Exception, match="depth_check"):
        PruneConfig(keep=0.5, depth_check=-1)


def test_auto_scores_the_candidates_of_a_uniform_search_beside_the_per_layer_ones(gqa_model, calib):
    """``auto`` runs a uniform search at the same budget after the per-layer one; its searched structure is the one
    a uniform search alone finds, and it competes in the depth check."""
    cfg = dict(keep=0.6, steps=6, warmup_steps=1, batch_size=2)
    result = prune(gqa_model, calib, PruneConfig(**cfg), progress=False)
    formats = [c["format"] for c in result.depth_check]
    assert formats[0] == "per-layer" and "uniform" in formats and result.uniform_steps_run == 6  # as many steps
    assert formats == sorted(formats)  # the per-layer search's candidates, then the uniform search's
    alone = prune(gqa_model, calib, PruneConfig(**cfg, format="uniform", depth_check=0), progress=False)
    assert result.candidates[formats.index("uniform")] == alone.structure
    assert all(s.is_uniform() for s, f in zip(result.candidates, formats) if f == "uniform")
    assert sum(c["chosen"] for c in result.depth_check) == 1 and result.met_budget
    assert alone.uniform_steps_run == 0


def test_the_stock_format_wins_within_the_tolerance():
    from dms_llm.search import choose_candidate

    shape = ModelShape(vocab_size=10, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4,
                       intermediate_size=8, tie_word_embeddings=True)
    per_layer, uniform = Structure.dense(shape), Structure.dense(shape)
    per_layer.layers[0].channels = per_layer.layers[0].channels[:4]
    assert not per_layer.is_uniform() and uniform.is_uniform()
    assert choose_candidate([1.0, 1.009], [per_layer, uniform])[0] == 1  # within 1%: stock
    index, why = choose_candidate([1.0, 1.02], [per_layer, uniform])
    assert index == 0 and "1.0200x" in why
    assert choose_candidate([1.1, 1.0], [per_layer, uniform])[0] == 1  # simply better
    assert choose_candidate([1.0, 1.0], [per_layer, per_layer])[0] == 0  # ties: the earlier


def test_format_settings_are_validated():
    assert PruneConfig(keep=0.5, uniform=True).format == "uniform"
    assert PruneConfig(keep=0.5, format="uniform").uniform and not PruneConfig(keep=0.5).uniform
    with pytest.raises(DMSError, match="format"):
        PruneConfig(keep=0.5, format="stock")
    with pytest.raises(DMSError, match="give one"):
        PruneConfig(keep=0.5, uniform=True, format="per-layer")


def test_successive_halving_scores_the_finalists_on_every_window_and_keeps_each_label(gqa_model, calib):
    """Structures spoiled step by step: the better half goes on after each round, the best of each label always
    does, and the finalists' losses equal those of a full scoring."""
    from dms_llm.search import calibration_losses

    shape = ModelShape.from_model(gqa_model)
    structures = []
    for removed in range(6):  # more MLP channels removed, loss rises
        s = Structure.dense(shape)
        for layer in s.layers:
            layer.channels = layer.channels[: len(layer.channels) - 8 * removed - 1]
        structures.append(s)
    labels = ["a"] * 5 + ["b"]  # the worst structure is the only "b": it must stay in
    windows = calib[:8]
    full, seen_all = calibration_losses(gqa_model, structures, windows, lm_weight=0.0)
    assert seen_all == [8] * 6 and full == sorted(full)  # KL only: nested removals, rising loss
    halved, seen = calibration_losses(gqa_model, structures, windows, lm_weight=0.0, halving=labels)
    # after 2 windows the best 3 and the best "b" go on, after 4 the best 2 and the "b"
    assert seen == [8, 8, 4, 2, 2, 8]
    for i, k in enumerate(seen):
        if k == 8:
            assert halved[i] == pytest.approx(full[i], rel=1e-5)


@pytest.mark.parametrize("fmt", ["per-layer", "uniform"])
def test_tensor_parallel_search_exports_a_model_that_size_splits(mha_model, calib, fmt):
    from dms_llm.exporter import build_pruned_model
    from dms_llm.vllm_plugin import tensor_parallel_sizes

    cfg = PruneConfig(keep=0.55, steps=8, warmup_steps=1, batch_size=2, format=fmt, patience=3, channel_multiple=1,
                      tensor_parallel=2, depth_check=0)
    result = prune(mha_model, calib, cfg, progress=False)
    assert result.pruned_resource <= result.target_resource
    config = build_pruned_model(mha_model, result.structure).config
    if fmt == "per-layer":
        assert 2 in tensor_parallel_sizes(config)
    else:
        assert config.num_attention_heads % 2 == 0 and config.intermediate_size % 2 == 0
    widths = [len(layer.channels) for layer in result.structure.layers] + [
        len(layer.kv_heads) for layer in result.structure.layers]
    assert all(w % 2 == 0 for w in widths) and any(0 < w < 96 for w in widths)


def test_tensor_parallel_the_model_cannot_split_stops_before_the_search(gqa_model, calib):
    with pytest.raises(DMSError, match="tensor_parallel=3.*sizes that can: 1, 2, 4"):
        prune(gqa_model, calib, PruneConfig(keep=0.6, steps=2, tensor_parallel=3), progress=False)
    with pytest.raises(DMSError, match="number of GPUs"):
        PruneConfig(keep=0.6, tensor_parallel=0)
