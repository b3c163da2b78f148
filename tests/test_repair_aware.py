import torch

from dms_llm.exporter import build_pruned_model
from dms_llm.gates import hard_masked
from dms_llm.reconstruct import ReconstructConfig, reconstruct
from dms_llm.repair_aware import RepairDeltas
from dms_llm.search import PruneConfig, prune
from dms_llm.structure import LayerStructure, Structure

from .test_search import _logits


def test_the_deltas_make_the_masked_model_compute_the_repaired_one(mha_model, calib):
    """Source weights + the deltas, masked to the structure, give the repaired sliced model's logits; with the deltas
    off (the teacher's view) the source model is untouched."""
    before = _logits(mha_model, calib[:2])
    layers = [LayerStructure([0, 2], list(range(0, 96, 2))), LayerStructure([], list(range(40))),
              LayerStructure([1, 2, 3], []), LayerStructure([0, 1, 2, 3], list(range(96)))]
    structure = Structure(1, 16, layers)
    config = ReconstructConfig(samples=6, check_windows=0)
    deltas = RepairDeltas(mha_model)
    deltas.refit(structure, calib, config)
    deltas.active = False  # the same repair, made the export's way (from the source weights)
    repaired = build_pruned_model(mha_model, structure, output_bias=True)
    reconstruct(repaired, mha_model, structure, calib, config, progress=False)
    deltas.active = True
    with hard_masked(mha_model, structure):
        got = _logits(mha_model, calib[:2])
    assert (got - _logits(repaired, calib[:2])).abs().max() < 1e-4
    with hard_masked(mha_model, structure):
        deltas.active = False
        sliced = _logits(mha_model, calib[:2])
    assert (sliced - got).abs().max() > 1e-3  # the repair changed something
    deltas.remove()
    assert torch.equal(_logits(mha_model, calib[:2]), before)
    assert not any(m._forward_hooks for m in mha_model.modules())


def test_a_search_with_the_repair_inside_meets_the_budget_and_leaves_the_model(mha_model, calib, caplog):
    import logging

    before = _logits(mha_model, calib[:1])
    cfg = PruneConfig(keep=0.6, steps=8, warmup_steps=1, batch_size=2, patience=100, repair_every=2, depth_check=0,
                      format="per-layer", target_decay=0.5)
    with caplog.at_level(logging.INFO, logger="dms_llm"):
        result = prune(mha_model, calib, cfg, progress=False)
    assert result.pruned_resource <= result.target_resource
    assert sum("searching on the repair" in r.message for r in caplog.records) == 2  # steps 5 and 7
    assert torch.equal(_logits(mha_model, calib[:1]), before)
    assert not any(m._forward_hooks for m in mha_model.modules())


def test_the_in_search_repair_default_resolves_and_round_trips_through_the_command(monkeypatch):
    import shlex

    import pytest

    from dms_llm import cli, search
    from dms_llm.errors import DMSError
    from dms_llm.pipeline import PRUNE_FLAGS, PruneJob, command_line

    assert PruneConfig(keep=0.5).repair_every == search.REPAIR_EVERY
    monkeypatch.setattr(search, "REPAIR_EVERY", 25)
    assert PruneConfig(keep=0.5).repair_every == 25 and not PruneConfig(keep=0.5).repair_takeover
    # where it cannot run, the default is off, and asking for it stops with why
    assert PruneConfig(keep=0.5, joint=True).repair_every == 0 == PruneConfig(keep=0.5, fsdp=True).repair_every
    with pytest.raises(DMSError, match="one process"):
        PruneConfig(keep=0.5, joint=True, repair_every=25)
    with pytest.raises(DMSError, match="0 = off"):
        PruneConfig(keep=0.5, repair_every=-1)
    # the recorded command names it only when it differs from the default, and parses back to the same value
    assert "--repair-every" not in command_line("prune", PruneJob("m", "o", PruneConfig(keep=0.5)), PRUNE_FLAGS)
    for every in (7, 0):  # 0 (off) is a value the command keeps, not a switch it drops
        command = command_line("prune", PruneJob("m", "o", PruneConfig(keep=0.5, repair_every=every)), PRUNE_FLAGS)
        assert cli.build_parser().parse_args(shlex.split(command)[1:]).repair_every == every
    assert cli.build_parser().parse_args(["prune", "m", "--keep", "0.5", "--out", "o"]).repair_every is None


def test_deltas_kept_in_the_autocast_dtype_compute_the_same(mha_model, calib):
    """bf16 deltas under bf16 autocast give exactly what fp32 ones do (autocast rounds them to bf16 anyway)."""
    structure = Structure(1, 16, [LayerStructure([0, 2], list(range(0, 96, 2)))] * 4)
    config = ReconstructConfig(samples=4, check_windows=0)
    got = []
    for dtype in (torch.float32, torch.bfloat16):
        deltas = RepairDeltas(mha_model, dtype)
        deltas.refit(structure, calib, config)
        assert {w.dtype for w, _ in deltas.deltas.values()} == {dtype}
        with hard_masked(mha_model, structure), torch.autocast("cpu", dtype=torch.bfloat16):
            got.append(_logits(mha_model, calib[:2]))
        deltas.remove()
    assert torch.equal(got[0], got[1])


def test_the_in_search_repair_uses_the_final_repairs_settings(mha_model, calib, monkeypatch):
    """`prune(..., repair=)` (what `dms-llm prune` passes from --recon-samples / --recon-ridge) reaches the repairs
    inside the search too, with the take-over as the search config says."""
    from dms_llm.reconstruct import ReconstructConfig

    seen = []
    monkeypatch.setattr(RepairDeltas, "refit", lambda self, structure, windows, config: seen.append(config))
    cfg = PruneConfig(keep=0.6, steps=6, warmup_steps=1, batch_size=2, patience=100, repair_every=2, depth_check=0,
                      format="per-layer", target_decay=0.5)
    prune(mha_model, calib, cfg, progress=False, repair=ReconstructConfig(samples=3, ridge=0.5))
    assert len(seen) == 2 and all((c.samples, c.ridge, c.absorb_removed) == (3, 0.5, False) for c in seen)
    seen.clear()
    prune(mha_model, calib, cfg, progress=False)
    assert len(seen) == 2 and all((c.samples, c.ridge) == (32, 1e-2) for c in seen)
