"""Recovery finetuning of a pruned model (docs/DESIGN.md §7): distillation from the dense model.

    L = w_kl * KL(teacher || student)  [+ w_lm * LM loss]

on windows of text, training either all weights or LoRA adapters (``peft``) that are merged into the weights at
the end, so the result is a plain checkpoint of the same format as the input. AdamW with warm-up and cosine decay,
gradient clipping; it runs in the training skeleton of :mod:`dms_llm.training` (one device, several processes,
resume, NaN and interrupt handling).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import DMSError
from .logits import HiddenTargets, OutputHead, final_hidden, next_token_loss
from .training import (
    Trainer,
    TrainingConfig,
    add_lora,
    check_windows,
    input_device,
    load_trainable_state,
    trainable_state,
)

logger = logging.getLogger("dms_llm")


class FinetuneError(DMSError, ValueError):
    """Settings or inputs of a recovery run that cannot work."""


@dataclass
class FinetuneConfig(TrainingConfig):
    """Settings of one recovery run. ``tokens`` is the training budget: steps = tokens / (batch_size * seq_len)."""

    checkpoint_every: int = 50
    tokens: int = 200_000
    batch_size: int = 4
    lr: float | None = None  # default: 2e-4 with LoRA, 1e-4 for all weights
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    kl_weight: float = 1.0
    lm_loss_weight: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not self.kl_weight and not self.lm_loss_weight:
            raise FinetuneError("`kl_weight` and `lm_loss_weight` are both 0: nothing to train on")
        if self.batch_size < 1:
            raise FinetuneError(f"`batch_size` must be at least 1, got {self.batch_size}")

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 1e-4)


@dataclass
class FinetuneResult:
    model: nn.Module  # the finetuned model (LoRA merged), the same object that was passed in
    steps_run: int
    tokens_seen: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


def check_teacher(model: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher whose logits cannot be compared with the pruned model's."""
    if teacher.config.vocab_size != model.config.vocab_size:
        raise FinetuneError(
            f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the pruned model's "
            f"({model.config.vocab_size}); distill from the model that was pruned"
        )


def check_budget(tokens: int, seq_len: int) -> None:
    """A token budget must cover at least one window."""
    if tokens < seq_len:
        raise FinetuneError(f"`tokens`={tokens} is less than one window of `seq_len`={seq_len} tokens")


def finetune(
    model: nn.Module,
    windows: torch.Tensor,
    config: FinetuneConfig,
    teacher: nn.Module | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Recover ``model`` (a pruned model, changed in place) by distilling ``teacher`` (the dense model; frozen)
    on ``windows`` ((num_samples, seq_len) token ids, reused in a new random order each epoch).

    With ``config.lora`` only LoRA adapters train and are merged into the weights before returning."""
    check_windows(windows, model.config.vocab_size)
    check_budget(config.tokens, windows.shape[1])
    if config.batch_size > len(windows):
        raise FinetuneError(f"`batch_size` must be in [1, {len(windows)}] (the number of windows), "
                            f"got {config.batch_size}")
    if teacher is not None:
        check_teacher(model, teacher)
    elif not config.lm_loss_weight:
        raise FinetuneError("without a teacher the only loss is the LM loss: set `lm_loss_weight` > 0")
    hint = "Try a lower `lr`, `mixed_precision='no'`, or LoRA (`lora=True`)."
    t0 = time.perf_counter()
    with Trainer(model, config, "recovery", hint, teacher=teacher) as run:
        run.place(model, teacher)
        trained = add_lora(model, config.lora_rank, config.lora_alpha) if config.lora else model
        if not config.lora:
            model.requires_grad_(True)
        completed = False
        try:
            history = _distill(trained, teacher, windows, config, run, progress)
            completed = True
        finally:
            if config.lora:  # merged on completion; removed unmerged otherwise: the model is as it was given
                unwrapped = run.accelerator.unwrap_model(trained)
                unwrapped.merge_and_unload() if completed else unwrapped.unload()
    model.requires_grad_(False)
    model.eval()
    run.accelerator.free_memory()
    tokens_per_step = config.batch_size * run.world * windows.shape[1]
    return FinetuneResult(model=model, steps_run=len(history), seconds=time.perf_counter() - t0, history=history,
                          tokens_seen=len(history) * tokens_per_step, config=asdict(config))


def _distill(trained: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, config: FinetuneConfig,
             run: Trainer, progress: bool) -> list[dict]:
    """The recovery steps: AdamW with warm-up and cosine decay on the distillation loss, from the start or from the
    saved state."""
    from transformers import get_cosine_schedule_with_warmup

    global_batch = config.batch_size * run.world
    steps = max(1, math.ceil(config.tokens / (global_batch * windows.shape[1])))
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate(), weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps), steps)
    # the schedule is not prepared: accelerate would step it once per process, but `steps` counts global batches
    trained = run.prepare(optimizer, trained)
    logger.info("recovery: %d steps of %d x %d tokens, %s trainable parameters (%s), lr %.1e", steps, global_batch,
                windows.shape[1], f"{sum(p.numel() for p in params):,}", "LoRA" if config.lora else "all weights",
                config.learning_rate())
    unwrapped = run.accelerator.unwrap_model(trained)
    history: list[dict] = []
    state = run.resume_state()
    if state is not None:
        load_trainable_state(unwrapped, state["trainable"])
        run.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]

    def distillation_loss(step: int):
        """w_kl * KL(teacher || student) + w_lm * LM loss, the head applied a few positions at a time."""
        ids = run.batch(windows, step, config.batch_size, config.seed + 7)
        targets = None
        if teacher is not None and config.kl_weight:
            with torch.no_grad():
                hidden = final_hidden(teacher, ids.to(input_device(teacher)))
                targets = HiddenTargets(hidden.reshape(-1, hidden.shape[-1]), OutputHead(teacher))
        return next_token_loss(final_hidden(trained, ids), OutputHead(trained), ids, targets, config.kl_weight,
                               config.lm_loss_weight)

    def adamw_update(step: int, loss: torch.Tensor, parts: dict) -> dict:
        grad_norm = run.accelerator.clip_grad_norm_(params, config.max_grad_norm)
        run.optimizer.step()
        scheduler.step()
        kl, lm = parts["kl"], parts["lm"]
        if run.world > 1:  # log the global batch's losses, not this process's share
            loss, kl, lm = (run.accelerator.reduce(t.detach(), reduction="mean") for t in (loss, kl, lm))
        record = {"step": step + 1, "loss": loss.item(), "kl": kl.item(), "lm": lm.item(),
                  "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                  "tokens": (step + 1) * global_batch * windows.shape[1]}
        if run.is_main:
            logger.log(run.log_every(step), "step %d/%d loss %.4f kl %.4f lm %.4f grad %.3f lr %.2e", step + 1,
                       steps, record["loss"], record["kl"], record["lm"], record["grad_norm"], record["lr"])
        return record

    def state_fn(step: int) -> dict:
        return {"trainable": trainable_state(unwrapped), "optimizer": run.optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "history": history, "config": asdict(config)}

    return run.run(steps, history, distillation_loss, adamw_update, state_fn,
                   postfix=lambda r: f"kl {r['kl']:.3f} lm {r['lm']:.3f}", progress=progress)


__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneResult", "check_budget", "check_teacher", "finetune"]
