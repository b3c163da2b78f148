"""Reconstruction: least-squares repair of the kept output projections, layer by layer, on tiny random Llamas."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from dms_llm.exporter import build_pruned_model, export
from dms_llm.reconstruct import ReconstructConfig, ReconstructionError, choose_after_repair, kl_to_dense, reconstruct
from dms_llm.resources import ResourceModel, count_parameters
from dms_llm.structure import ModelShape, Structure
from dms_llm.training import kl_divergence

from .conftest import per_layer_structure


def _gap(pruned, dense, ids):
    with torch.no_grad():
        return kl_divergence(pruned(input_ids=ids).logits, dense(input_ids=ids).logits).item()


@pytest.fixture
def windows():
    return torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(3))


def test_repair_lowers_every_block_error_and_the_gap_to_the_dense_model(gqa_model, windows):
    structure = Structure.dense(ModelShape.from_model(gqa_model))  # narrower blocks everywhere, none removed
    structure.layers[0].channels = structure.layers[0].channels[:48]
    structure.layers[1].kv_heads = [1]
    structure.layers[2].channels = structure.layers[2].channels[::3]
    structure.layers[3].kv_heads, structure.layers[3].channels = [0], structure.layers[3].channels[24:]
    pruned = build_pruned_model(gqa_model, structure)
    before = _gap(pruned, gqa_model, windows)
    report = reconstruct(pruned, gqa_model, structure, windows, ReconstructConfig(samples=None), progress=False)
    assert report["tokens"] == windows.numel() and len(report["blocks"]) == 8
    assert all(r["error_after"] < r["error_before"] for r in report["blocks"] if r["error_before"] > 1e-9)
    assert _gap(pruned, gqa_model, windows) < 0.7 * before
    assert all(torch.isfinite(p).all() for p in pruned.parameters())


def test_the_first_mlp_gets_the_ridge_solution_of_its_own_features(gqa_model, windows):
    """Layer 0's MLP, after an untouched attention block, sees the dense stream: its refit must be the explicit ridge
    solution W = (X^T X + lam I)^-1 (X^T Y + lam W0[:, kept]) on the dense features X and the dense output Y."""
    structure = Structure.dense(ModelShape.from_model(gqa_model))
    kept = structure.layers[0].channels[::2]
    structure.layers[0].channels = kept
    pruned = build_pruned_model(gqa_model, structure)
    reconstruct(pruned, gqa_model, structure, windows, ReconstructConfig(samples=None, check_windows=0),
                progress=False)
    down = gqa_model.model.layers[0].mlp.down_proj
    seen = {}
    handle = down.register_forward_hook(lambda m, args, out: seen.update(z=args[0].detach(), y=out.detach()))
    with torch.no_grad():
        gqa_model(input_ids=windows)
    handle.remove()
    x = seen["z"][..., kept].reshape(-1, len(kept)).double()
    y = seen["y"].reshape(-1, seen["y"].shape[-1]).double()
    xx = x.T @ x
    lam = 1e-2 * xx.diagonal().mean()
    w0 = down.weight.detach().double()[:, kept]
    expected = torch.linalg.solve(xx + lam * torch.eye(len(kept), dtype=xx.dtype), x.T @ y + lam * w0.T).T
    got = pruned.model.layers[0].mlp.down_proj.weight.double()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not torch.allclose(got, w0, atol=1e-3)  # it did move


def test_removed_blocks_are_taken_over_by_the_next_kept_block(gqa_model, windows, caplog):
    structure = per_layer_structure(gqa_model)  # layer 2 lost its attention block, layer 3 (the last) its MLP
    with caplog.at_level(logging.INFO, logger="dms_llm"):
        report = reconstruct(build_pruned_model(gqa_model, structure), gqa_model, structure, windows, progress=False)
    absorbs = {(r["layer"], r["block"]): r["absorbs"] for r in report["blocks"]}
    assert set(absorbs) == {(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp"), (2, "mlp"), (3, "attention")}
    assert absorbs[2, "mlp"] == ["2.attention"] and sum(map(len, absorbs.values())) == 1
    assert "no kept block after 3.mlp" in caplog.text


def test_taking_over_removed_blocks_brings_the_model_closer_to_the_dense_one(gqa_model, windows):
    shape = ModelShape.from_model(gqa_model)
    structure = Structure.dense(shape)
    structure.layers[1].kv_heads, structure.layers[1].channels = [], []  # a whole layer and a block removed
    structure.layers[2].kv_heads = []
    structure.layers[0].channels = structure.layers[0].channels[:64]
    gaps = {}
    for absorb in (False, True):
        pruned = build_pruned_model(gqa_model, structure)
        report = reconstruct(pruned, gqa_model, structure, windows, ReconstructConfig(samples=None,
                             absorb_removed=absorb), progress=False)
        gaps[absorb] = _gap(pruned, gqa_model, windows)
    taker = next(r for r in report["blocks"] if r["absorbs"])
    assert (taker["layer"], taker["block"], taker["absorbs"]) == (2, "mlp", ["1.attention", "1.mlp", "2.attention"])
    assert taker["error_after"] < taker["error_before"]
    assert gaps[True] < 0.8 * gaps[False]


def test_nothing_to_repair_leaves_the_weights_as_they_are(gqa_model, windows):
    structure = Structure.dense(ModelShape.from_model(gqa_model))
    pruned = build_pruned_model(gqa_model, structure)
    with torch.no_grad():
        expected = gqa_model(input_ids=windows[:2]).logits
    report = reconstruct(pruned, gqa_model, structure, windows, progress=False)
    assert max(r["error_after"] for r in report["blocks"]) < 1e-6
    with torch.no_grad():
        assert (pruned(input_ids=windows[:2]).logits - expected).abs().max() < 1e-3


def test_only_the_output_projections_change(gqa_model, windows):
    structure = per_layer_structure(gqa_model)
    pruned = build_pruned_model(gqa_model, structure)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    reconstruct(pruned, gqa_model, structure, windows, progress=False)
    changed = {k for k, v in pruned.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("o_proj.weight", "down_proj.weight")) for k in changed)


def test_existing_output_biases_are_refit(gqa_model, windows):
    """Per-layer models with output biases (e.g. FLAP's compensation) get their biases refit with the weights."""
    structure = per_layer_structure(gqa_model)
    pruned = build_pruned_model(gqa_model, structure, output_bias=True)
    reconstruct(pruned, gqa_model, structure, windows, progress=False)
    assert pruned.model.layers[0].mlp.down_proj.bias.abs().max() > 0
    no_bias = build_pruned_model(gqa_model, structure, output_bias=True)
    reconstruct(no_bias, gqa_model, structure, windows, ReconstructConfig(bias=False), progress=False)
    assert no_bias.model.layers[0].mlp.down_proj.bias.abs().max() == 0


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def more_windows():  # 16 to fit, 8 to check on
    return torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(3))


def test_the_repair_checks_itself_on_windows_it_did_not_read(gqa_model, more_windows):
    structure = per_layer_structure(gqa_model)
    pruned = build_pruned_model(gqa_model, structure)
    report = reconstruct(pruned, gqa_model, structure, more_windows, ReconstructConfig(samples=16, check_windows=8),
                         progress=False)
    check = report["check"]
    assert report["tokens"] == 16 * 32 and check["windows"] == 8 and check["kept"] == "repaired"
    assert check["repaired"] < 0.9 * check["sliced"]
    assert reconstruct(build_pruned_model(gqa_model, structure), gqa_model, structure, more_windows[:16],
                       ReconstructConfig(samples=16), progress=False)["check"] is None  # no window left to check on


@pytest.mark.parametrize("spoil, kept", [("every", "sliced"), ("take-over", "without take-over")])
def test_a_repair_that_moves_away_from_the_dense_model_is_not_kept(gqa_model, more_windows, monkeypatch, spoil, kept,
                                                                   caplog):
    import dms_llm.reconstruct as module

    refit = module._refit

    def spoiled(dense, pruned, kept_columns, sums, config, where):  # a repair gone wrong: huge output weights
        result = refit(dense, pruned, kept_columns, sums, config, where)
        if spoil == "every" or (where == "layer 2 mlp" and config.absorb_removed):  # taking over layer 2's attention
            pruned.weight.mul_(200.0)
        return result

    monkeypatch.setattr(module, "_refit", spoiled)
    structure = per_layer_structure(gqa_model)  # layer 2's attention removed: the MLP after it takes it over
    pruned = build_pruned_model(gqa_model, structure)
    with caplog.at_level(logging.WARNING, logger="dms_llm"):
        report = reconstruct(pruned, gqa_model, structure, more_windows, ReconstructConfig(samples=16),
                             progress=False)
    check = report["check"]
    assert check["kept"] == kept and f"kept the {kept} weights" in caplog.text
    assert check["repaired"] > check["sliced"]
    assert (check["without_takeover"] > check["sliced"]) == (kept == "sliced")
    undone = all(b["error_after"] == b["error_before"] for b in report["blocks"])
    assert undone == (kept == "sliced")  # the block errors are those of the weights the model keeps
    monkeypatch.setattr(module, "_refit", refit)
    expected = build_pruned_model(gqa_model, structure)
    if kept == "without take-over":
        reconstruct(expected, gqa_model, structure, more_windows[:16], ReconstructConfig(absorb_removed=False),
                    progress=False)
    assert torch.allclose(_logits(pruned, more_windows[:2]), _logits(expected, more_windows[:2]), atol=1e-5)


def test_the_choice_after_the_repair_keeps_the_candidate_closest_to_the_dense_model(gqa_model, windows):
    """Candidates are repaired and scored on held-out windows: the dense structure (KL 0) beats a pruned one, the
    returned model is that candidate repaired, and a tie goes to the earlier candidate."""
    shape = ModelShape.from_model(gqa_model)
    narrow, dense = per_layer_structure(gqa_model), Structure.dense(shape)
    calib, held_out = windows[:12], windows[12:]
    index, losses, model, repair, why = choose_after_repair(gqa_model, [narrow, dense], calib, held_out,
                                                            ReconstructConfig(samples=8, check_windows=0))
    assert index == 1 and losses[1] < 1e-6 < losses[0] and repair["blocks"] and "lowest" in why
    assert count_parameters(model) == count_parameters(gqa_model)
    alone = build_pruned_model(gqa_model, narrow)
    reconstruct(alone, gqa_model, narrow, calib, ReconstructConfig(samples=8, check_windows=0), progress=False)
    assert abs(kl_to_dense(alone, gqa_model, held_out) - losses[0]) < 1e-6  # the score is the repaired model's
    index, losses, model, _, _ = choose_after_repair(gqa_model, [narrow, narrow], calib, held_out,
                                                     ReconstructConfig(samples=8, check_windows=0))
    assert index == 0 and losses[0] == losses[1]
    with pytest.raises(Exception, match="at least one candidate"):
        choose_after_repair(gqa_model, [], calib, held_out)


def test_the_check_after_the_repair_scores_under_bf16_close_to_fp32(gqa_model, windows):
    """At the search's bf16 precision the repaired candidates' KLs stay close to fp32's (the repair stays fp32)."""
    shape = ModelShape.from_model(gqa_model)
    candidates = [per_layer_structure(gqa_model), Structure.dense(shape)]
    calib, held_out = windows[:12], windows[12:]
    settings = ReconstructConfig(samples=8, check_windows=0)
    fp32 = choose_after_repair(gqa_model, candidates, calib, held_out, settings)
    bf16 = choose_after_repair(gqa_model, candidates, calib, held_out, settings, precision="bf16")
    assert bf16[0] == fp32[0] and bf16[1] != fp32[1]  # the same choice; the scores were taken in bf16
    assert bf16[1][0] == pytest.approx(fp32[1][0], rel=0.05) and bf16[1][1] < 1e-2


def test_repaired_export_reloads_with_the_same_logits(gqa_model, windows, tmp_path):
    structure = per_layer_structure(gqa_model)
    pruned = build_pruned_model(gqa_model, structure)
    reconstruct(pruned, gqa_model, structure, windows, progress=False)
    result = export(gqa_model, structure, tmp_path / "out", pruned=pruned)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    with torch.no_grad():
        assert (reloaded(input_ids=windows[:2]).logits - pruned(input_ids=windows[:2]).logits).abs().max() <= 1e-4
    shape = ModelShape.from_model(gqa_model)
    assert result.params == count_parameters(reloaded) == ResourceModel(shape).of_structure(structure)


def test_uniform_structure_is_refit_without_a_bias_and_stays_stock(gqa_model, windows, tmp_path):
    shape = ModelShape.from_model(gqa_model)
    structure = Structure.dense(shape)
    for layer in structure.layers:
        layer.kv_heads, layer.channels = [0], layer.channels[:48]
    pruned = build_pruned_model(gqa_model, structure, output_bias=True)  # no bias: a stock config has none
    before = _gap(pruned, gqa_model, windows)
    reconstruct(pruned, gqa_model, structure, windows, progress=False)
    assert _gap(pruned, gqa_model, windows) < before
    export(gqa_model, structure, tmp_path / "u", pruned=pruned)
    assert type(LlamaForCausalLM.from_pretrained(tmp_path / "u")) is LlamaForCausalLM


def test_too_few_tokens_and_dead_channels_are_kept_well_posed(gqa_model, caplog):
    structure = per_layer_structure(gqa_model)
    with torch.no_grad():
        gqa_model.model.layers[0].mlp.gate_proj.weight[:10] = 0  # channels that are never active: a singular Gram
    pruned = build_pruned_model(gqa_model, structure)
    few = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))  # 8 tokens for 96 features
    with caplog.at_level(logging.WARNING, logger="dms_llm"):
        reconstruct(pruned, gqa_model, structure, few, progress=False)
    warnings = [r for r in caplog.records if "ridge" in r.getMessage()]
    assert len(warnings) == 1  # one summary line for the repair, not one per block
    assert "fewer calibration tokens (8) than kept features" in warnings[0].getMessage()
    assert all(torch.isfinite(p).all() for p in pruned.parameters())


def test_non_finite_statistics_stop_with_the_block_named(gqa_model, windows):
    structure = per_layer_structure(gqa_model)
    pruned = build_pruned_model(gqa_model, structure)
    with torch.no_grad():
        gqa_model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ReconstructionError, match="layer 1 mlp: the calibration statistics are not finite"):
        reconstruct(pruned, gqa_model, structure, windows, progress=False)


@pytest.mark.parametrize("bad, message", [(dict(samples=0), "samples"), (dict(ridge=0.0), "ridge"),
                                          (dict(batch_size=0), "batch_size"), (dict(check_windows=-1), "check")])
def test_bad_settings_are_refused(bad, message):
    from dms_llm.errors import DMSError

    with pytest.raises(DMSError, match=message):
        ReconstructConfig(**bad)
