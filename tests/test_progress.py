"""Long work logs a line at least every HEARTBEAT_SECONDS (dms_llm/progress.py), also when output is not a terminal."""

import logging

import torch

import dms_llm.progress as progress_mod
from dms_llm.exporter import build_pruned_model
from dms_llm.progress import Heartbeat
from dms_llm.reconstruct import reconstruct
from dms_llm.search import PruneConfig, prune

from .conftest import per_layer_structure


def test_heartbeat_logs_once_the_interval_has_passed(caplog):
    now = [0.0]
    beat = Heartbeat("scoring", 10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="dms_llm"):
        for done, t in enumerate([5.0, 29.0, 31.0, 40.0, 62.0], 1):
            now[0] = t
            beat.tick(done)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["scoring: 3/10 done (31 s)", "scoring: 5/10 done (62 s)"]


def test_a_repair_logs_progress_when_it_runs_longer_than_the_interval(gqa_model, calib, caplog, monkeypatch):
    monkeypatch.setattr(progress_mod, "HEARTBEAT_SECONDS", 0.0)  # every tick is due
    structure = per_layer_structure(gqa_model)
    pruned = build_pruned_model(gqa_model, structure)
    with caplog.at_level(logging.INFO, logger="dms_llm"):
        reconstruct(pruned, gqa_model, structure, calib, progress=False)
    layers = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reconstruction, layers")]
    n = len(gqa_model.model.layers)
    assert layers[-1].startswith(f"reconstruction, layers: {n}/{n} done")
    assert len(layers) == n and all(torch.isfinite(p).all() for p in pruned.parameters())


def test_step_lines_are_logged_when_the_interval_has_passed(gqa_model, calib, caplog, monkeypatch):
    """Between checkpoints (every 50 steps) a step line reaches the log once the interval has passed."""
    monkeypatch.setattr(progress_mod, "HEARTBEAT_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="dms_llm"):
        prune(gqa_model, calib, PruneConfig(keep=0.7, steps=5, warmup_steps=1, patience=100, depth_check=0,
                                            format="per-layer"), progress=False)
    steps = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
             and r.getMessage().startswith("step ") and "searching on the repair" not in r.getMessage()]
    assert [line.split()[1] for line in steps] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
