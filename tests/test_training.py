"""The training skeleton shared by the search and the recovery: restore the model whatever happens, resume exactly
after a real SIGKILL, stop on a non-finite loss with the last good state."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dms_llm import training
from dms_llm.training import Trainer, TrainingConfig, TrainingError, batch_of, resolve_precision

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



def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text.format(tests=os.path.dirname(__file__)))
    return str(path)


def test_sigkilled_search_resumes_to_the_same_result(tmp_path):
    script = _script(tmp_path, "search.py", SEARCH)
    full = subprocess.run([sys.executable, script, "", "fresh"], capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    ckpt = tmp_path / "state.pt"
    proc = subprocess.Popen([sys.executable, script, str(ckpt), "fresh"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
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



def test_trainer_restores_the_model_after_an_error(gqa_model):
    gqa_model.lm_head.weight.requires_grad_(False)
    flags = [p.requires_grad for p in gqa_model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with Trainer(gqa_model, TrainingConfig(activation_checkpointing=True), "test") as run:
            run.place(gqa_model)
            gqa_model.requires_grad_(False)
            assert gqa_model.training and run.checkpointing  # train mode for transformers' checkpointing
            raise RuntimeError("boom")
    assert [p.requires_grad for p in gqa_model.parameters()] == flags and not gqa_model.training
    assert not gqa_model.is_activation_checkpointing


def test_trainer_loop_stops_on_a_nonfinite_loss_with_the_last_good_state(gqa_model, tmp_path):
    weight = torch.nn.Parameter(torch.ones(()))
    path = tmp_path / "state.pt"
    with Trainer(gqa_model, TrainingConfig(checkpoint_path=str(path)), "toy", "Try less.") as run:
        run.prepare(torch.optim.SGD([weight], lr=0.1))

        def loss_fn(step):
            return (weight * 2 if step < 3 else weight * float("inf")), {}

        def update_fn(step, loss, parts):
            run.optimizer.step()
            return {"step": step + 1, "w": weight.item()}

        history = []
        with pytest.raises(FloatingPointError, match="toy loss became inf at step 4; the state after step 3.*Try less"):
            run.run(10, history, loss_fn, update_fn, lambda step: {"step": step, "w": weight.item()}, progress=False)
    assert torch.load(path)["step"] == 3 and len(history) == 3


def test_batches_depend_only_on_seed_and_step():
    windows = torch.arange(40).view(10, 4)
    assert torch.equal(batch_of(windows, 7, 3, seed=1), batch_of(windows, 7, 3, seed=1))
    assert not torch.equal(batch_of(windows, 0, 3, seed=1), batch_of(windows, 0, 3, seed=2))
    epoch = torch.cat([batch_of(windows, i, 2, seed=0) for i in range(5)])
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 40, 4))  # an epoch visits every window once


def test_bad_training_settings_are_refused():
    with pytest.raises(TrainingError, match="mixed_precision"):
        TrainingConfig(mixed_precision="fp8")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_device_multiplies_in_bf16(monkeypatch, native):
    monkeypatch.setattr(training, "native_bf16", lambda device_type: native)
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "no")
    assert resolve_precision("no", "cpu") == "no" and resolve_precision("bf16", "cpu") == "bf16"
    model = torch.nn.Linear(4, 4)
    with Trainer(model, TrainingConfig(mixed_precision="auto"), "test", "") as run:
        assert run.precision == ("bf16" if native else "no")
        with run.accelerator.autocast():
            out = model(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
