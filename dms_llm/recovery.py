"""Recovery finetuning of a pruned model (DESIGN.md §3): distillation from the dense model.

    L = w_kl * KL(teacher || student)  [+ w_lm * LM loss]

on windows of calibration text, training either all weights or LoRA adapters (``peft``) that are merged into the
weights at the end, so the result is a plain checkpoint of the same format as the input. Runs under
``accelerate`` (one device, or data parallel under ``accelerate launch``); the state (trained weights, optimizer,
schedule, step, log) is saved every ``checkpoint_every`` steps and on Ctrl-C, and ``resume`` continues from it
with the same data order, so an interrupted run ends where an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .search import (_batch, _disable_checkpointing, _enable_checkpointing, _kl, _lm_loss, _shard, input_device,
                     is_dispatched, load_trainable_state, save_atomically, trainable_state)

logger = logging.getLogger("dms_llm")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FinetuneError(ValueError):
    """Settings or inputs of a recovery run that cannot work."""


@dataclass
class FinetuneConfig:
    """Settings of one recovery run. ``tokens`` is the training budget: steps = tokens / (batch_size * seq_len)."""

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
    seed: int = 0
    mixed_precision: str = "no"
    activation_checkpointing: bool | None = None
    checkpoint_path: str | None = None
    checkpoint_every: int = 50
    resume: bool = False

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


def _check_inputs(model: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, config: FinetuneConfig) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise FinetuneError("windows must be a (num_samples, seq_len) tensor of token ids; see dms_llm.calibration_windows")
    vocab = model.config.vocab_size
    if windows.min() < 0 or windows.max() >= vocab:
        raise FinetuneError(f"token ids must lie in [0, {vocab}); was the model's tokenizer used?")
    if config.tokens < windows.shape[1]:
        raise FinetuneError(f"tokens={config.tokens} is less than one window of {windows.shape[1]} tokens")
    if config.batch_size < 1 or config.batch_size > len(windows):
        raise FinetuneError(f"batch_size must be in [1, {len(windows)}] (the number of windows), got {config.batch_size}")
    if teacher is not None:
        check_teacher(model, teacher)
    if teacher is None and not config.lm_loss_weight:
        raise FinetuneError("without a teacher the only loss is the LM loss: set lm_loss_weight > 0")
    if not config.kl_weight and not config.lm_loss_weight:
        raise FinetuneError("kl_weight and lm_loss_weight are both 0: nothing to train on")


def _add_lora(model: nn.Module, config: FinetuneConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'dms-llm[peft]'") from None
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in LORA_TARGETS if t in names]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


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
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    _check_inputs(model, teacher, windows, config)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    device, world = accelerator.device, accelerator.num_processes
    global_batch = config.batch_size * world
    if global_batch > len(windows):
        raise FinetuneError(f"{world} processes x batch_size {config.batch_size} exceed the {len(windows)} windows")
    steps = max(1, math.ceil(config.tokens / (global_batch * windows.shape[1])))

    if is_dispatched(model) or (teacher is not None and is_dispatched(teacher)):
        if world > 1:
            raise FinetuneError("models dispatched with a device_map train in one process only")
        device = input_device(model)
    else:
        model.to(device)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
        if not is_dispatched(teacher):
            teacher.to(device)
    checkpointing = config.activation_checkpointing
    if checkpointing is None:
        checkpointing = device.type == "cuda"
    checkpointing = checkpointing and _enable_checkpointing(model)
    trained = _add_lora(model, config) if config.lora else model
    if not config.lora:
        model.requires_grad_(True)
    model.train()
    params = [p for p in trained.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate(), weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps), steps)
    # the schedule is not prepared: accelerate would step it once per process, but `steps` already counts
    # global batches
    trained, optimizer = accelerator.prepare(trained, optimizer)
    logger.info("recovery: %d steps of %d x %d tokens, %s trainable parameters (%s), lr %.1e", steps, global_batch,
                windows.shape[1], f"{n_trainable:,}", "LoRA" if config.lora else "all weights", config.learning_rate())

    ckpt = Path(config.checkpoint_path) if config.checkpoint_path else None
    start, history = 0, []
    if config.resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        load_trainable_state(accelerator.unwrap_model(trained), state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
        logger.info("resumed the recovery from %s at step %d", ckpt, start)

    def save(step: int) -> None:
        if ckpt is not None and accelerator.is_main_process:
            save_atomically(ckpt, {"trainable": trainable_state(accelerator.unwrap_model(trained)),
                                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "step": step, "history": history, "config": asdict(config)})

    t0, completed = time.perf_counter(), False
    bar = tqdm(range(start, steps), desc="recovery", dynamic_ncols=True,
               disable=not progress or not accelerator.is_main_process)
    try:
        for step in bar:
            ids = _shard(_batch(windows, step, global_batch, config.seed + 7), accelerator).to(device)
            with accelerator.autocast():
                logits = trained(input_ids=ids, use_cache=False).logits
                kl = torch.zeros((), device=device)
                if teacher is not None and config.kl_weight:
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=ids.to(input_device(teacher)), use_cache=False).logits
                    teacher_logits = teacher_logits.to(logits.device)
                    kl = _kl(logits, teacher_logits)
                lm = _lm_loss(logits, ids)
                loss = config.kl_weight * kl + config.lm_loss_weight * lm
            if not torch.isfinite(loss):
                where = ""
                if ckpt is not None:  # the weights still hold the state after the last good step
                    save(step)
                    where = f"; the state after step {step} is saved in {ckpt} (continue with --resume and a lower --lr)"
                raise FloatingPointError(
                    f"the recovery loss became {loss.item()} at step {step + 1}{where}. Try a lower --lr, "
                    f"--mixed-precision no, or LoRA (--lora)"
                )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if world > 1:  # log the global batch's losses, not this process's share
                loss, kl, lm = (accelerator.reduce(t.detach(), reduction="mean") for t in (loss, kl, lm))
            record = {"step": step + 1, "loss": loss.item(), "kl": kl.item(), "lm": lm.item(),
                      "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                      "tokens": (step + 1) * global_batch * windows.shape[1]}
            history.append(record)
            if accelerator.is_main_process:
                logger.info("step %d/%d loss %.4f kl %.4f lm %.4f grad %.3f lr %.2e", step + 1, steps, record["loss"],
                            record["kl"], record["lm"], record["grad_norm"], record["lr"])
            bar.set_postfix_str(f"kl {record['kl']:.3f} lm {record['lm']:.3f}")
            if (step + 1) % config.checkpoint_every == 0:
                save(step + 1)
        bar.close()
        completed = True
    except KeyboardInterrupt:
        save(len(history))
        if ckpt is not None:
            logger.warning("interrupted: recovery state of step %d saved to %s (continue with --resume)",
                           len(history), ckpt)
        raise
    finally:
        if checkpointing:
            _disable_checkpointing(model)
        if not completed:  # leave the caller's model as it was given: adapters removed without merging
            if config.lora:
                accelerator.unwrap_model(trained).unload()
            model.requires_grad_(False)

    seconds = time.perf_counter() - t0
    save(len(history))
    trained = accelerator.unwrap_model(trained)
    if config.lora:
        trained = trained.merge_and_unload()  # the original model object, LoRA folded into its Linear weights
    model.requires_grad_(False)
    model.eval()
    accelerator.free_memory()
    return FinetuneResult(model=model, steps_run=len(history), tokens_seen=len(history) * global_batch * windows.shape[1],
                          seconds=seconds, history=history, config=asdict(config))


def save_recovered(
    model: nn.Module,
    out_dir: str | Path,
    source_dir: str | Path,
    tokenizer=None,
    recovery: dict | None = None,
    overwrite: bool = False,
    perplexity: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save a finetuned dms-llm export like the export itself: same format, ``dms_structure.json`` of the source
    plus a ``recovery`` record, model card, plot; written to a temporary folder, reloaded, checked against the
    model in memory, then moved into place. ``source_dir`` (the pruned input) is never modified."""
    from .exporter import check_output_dir, load_structure_file, probe_ids, write_checkpoint
    from .structure import Structure

    info = load_structure_file(source_dir)
    structure = Structure.from_dict(info.pop("structure"))
    out = check_output_dir(out_dir, source_dir, overwrite)
    info["recovery"] = recovery or {}
    if perplexity:
        info["perplexity"] = {**(info.get("perplexity") or {}), **perplexity}
    info.setdefault("dense_query_heads", max(info["kept_query_heads"]))
    info.setdefault("dense_mlp_channels", max(info["kept_mlp_channels"]))
    device = next(model.parameters()).device
    probe = probe_ids(model.config.vocab_size, device)
    with torch.no_grad():
        reference = model(input_ids=probe, use_cache=False).logits.float()
    write_checkpoint(model, out, structure, info, probe, reference, tokenizer=tokenizer, extra_files=extra_files)
    return out
