import pytest
import torch

from dms_llm.resources import ResourceModel
from dms_llm.search import BudgetError, PruneConfig, prune
from dms_llm.structure import ModelShape


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("uniform", [False, True])
def test_search_meets_budget_and_leaves_model_unchanged(gqa_model, calib, uniform):
    before = _logits(gqa_model, calib[:1])
    cfg = PruneConfig(keep=0.7, steps=12, warmup_steps=2, batch_size=2, uniform=uniform, mlp_unit=8, patience=3)
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


def test_search_is_reproducible_with_a_seed(gqa_model, calib):
    cfg = PruneConfig(keep=0.6, steps=6, warmup_steps=1, batch_size=2, seed=3)
    a = prune(gqa_model, calib, cfg, progress=False)
    b = prune(gqa_model, calib, cfg, progress=False)
    assert a.structure == b.structure


def test_search_resumes_to_the_same_structure(gqa_model, calib, tmp_path, monkeypatch):
    import dms_llm.search as search_mod

    base = dict(keep=0.6, steps=10, warmup_steps=1, batch_size=2, seed=1, patience=100, checkpoint_every=4)
    full = prune(gqa_model, calib, PruneConfig(**base), progress=False)
    ckpt = tmp_path / "state.pt"
    real_batch = search_mod._batch

    def interrupt_at_step_7(windows, step, batch_size, seed):
        if step == 6:
            raise KeyboardInterrupt
        return real_batch(windows, step, batch_size, seed)

    monkeypatch.setattr(search_mod, "_batch", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        prune(gqa_model, calib, PruneConfig(**base, checkpoint_path=str(ckpt)), progress=False)
    assert torch.load(ckpt, weights_only=False)["step"] == 6
    monkeypatch.setattr(search_mod, "_batch", real_batch)
    resumed = prune(gqa_model, calib, PruneConfig(**base, checkpoint_path=str(ckpt), resume=True), progress=False)
    assert resumed.steps_run == 10 and resumed.history == full.history
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


def test_bf16_mixed_precision_search_is_finite(gqa_model, calib):
    cfg = PruneConfig(keep=0.7, steps=4, warmup_steps=1, batch_size=2, mixed_precision="bf16")
    result = prune(gqa_model, calib, cfg, progress=False)
    assert all(torch.isfinite(torch.tensor([h["loss"], h["kl"]])).all() for h in result.history)
    assert result.met_budget
