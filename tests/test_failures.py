"""Failures that must stop cleanly: NaN loss, full disk, read-only output."""

import errno

import pytest
import torch

import dms_llm.exporter as export_mod
import dms_llm.search as search_mod
from dms_llm.exporter import ExportError, export
from dms_llm.search import PruneConfig, prune
from dms_llm.structure import ModelShape, Structure


def test_nan_loss_stops_and_keeps_the_last_good_state(gqa_model, calib, tmp_path, monkeypatch):
    real_kl, calls = search_mod._kl, {"n": 0}

    def kl_nan_at_step_3(student, teacher):
        calls["n"] += 1
        value = real_kl(student, teacher)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(search_mod, "_kl", kl_nan_at_step_3)
    ckpt = tmp_path / "state.pt"
    cfg = PruneConfig(keep=0.7, steps=10, warmup_steps=1, batch_size=2, checkpoint_path=str(ckpt))
    with pytest.raises(FloatingPointError, match="at step 3.*after step 2"):
        prune(gqa_model, calib, cfg, progress=False)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 2 and len(state["history"]) == 2
    assert all(torch.isfinite(v).all() for v in state["gates"].values() if v.is_floating_point())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in gqa_model.modules())


def test_full_disk_during_export_leaves_old_output(gqa_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    s = Structure.dense(ModelShape.from_model(gqa_model))
    real_build = export_mod.build_pruned_model

    def build_then_fail_on_save(model, structure):
        pruned = real_build(model, structure)

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        pruned.save_pretrained = no_space
        return pruned

    monkeypatch.setattr(export_mod, "build_pruned_model", build_then_fail_on_save)
    with pytest.raises(ExportError, match="No space left.*free disk space"):
        export(gqa_model, s, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "previous"


def test_read_only_output_is_refused_before_work(gqa_model, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod.os, "access", lambda path, mode: False)  # root ignores chmod; simulate
    with pytest.raises(ExportError, match="read-only"):
        export_mod.check_output_dir(tmp_path / "new" / "out", None, False)
