"""The DMS search (DESIGN.md §3): learn how many heads, channels and blocks to keep under a budget.

    L = KL(dense || gated) [+ w_lm * LM loss]  +  lambda_res * max(0, log(r_c / r_t))

Weights stay frozen; only the operators' ``a``s are trained (Adam), and the Taylor importances are updated
from the task-loss gradients of the masks. The teacher is the same model with the gates off, so no second copy
is held in memory. In joint mode LoRA adapters (peft) train together with the ``a``s (the teacher runs with the
adapters disabled) and are merged into the weights at the end. ``r_t`` decays exponentially from the dense cost to the target over the first part of the
search, then holds; the search stops at ``steps`` or once the hard structure meets the target and has not
changed for ``patience`` steps. A final projection raises every ``a`` by the same amount if the hard choice is
still above the target, so the returned structure always meets the budget.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .gates import DMSGates
from .resources import ResourceModel
from .structure import ModelShape, Structure, decoder_layers

logger = logging.getLogger("dms_llm")


class BudgetError(ValueError):
    """The requested budget is outside what the search space can reach."""


@dataclass
class PruneConfig:
    """Settings of one DMS search. Give the budget as ``keep`` (fraction of the dense resource) or ``target``."""

    keep: float | None = None
    target: int | None = None
    resource: str = "params"  # or "macs" (per sequence of macs_seq_len tokens)
    macs_seq_len: int = 2048
    uniform: bool = False
    mlp_unit: int = 8
    steps: int = 200
    warmup_steps: int = 4
    batch_size: int = 1
    lr: float = 0.1
    resource_weight: float = 50.0
    lm_loss_weight: float = 1.0
    importance_momentum: float = 0.99
    target_decay: float = 0.5
    patience: int = 10
    seed: int = 0
    mixed_precision: str = "no"
    activation_checkpointing: bool | None = None
    checkpoint_path: str | None = None
    checkpoint_every: int = 25
    resume: bool = False
    fsdp: bool = False  # under accelerate launch: shard the frozen weights (FSDP2, decoder layer = wrap unit)
    joint: bool = False  # also train LoRA adapters during the search, merged into the weights at the end
    joint_lr: float = 1e-4
    lora_rank: int = 16
    lora_alpha: int = 32


@dataclass
class PruneResult:
    structure: Structure
    resource_kind: str
    dense_resource: int
    target_resource: int
    pruned_resource: int
    search_seconds: float
    steps_run: int
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    weights_updated: bool = False  # joint mode: LoRA merged into the model's weights

    @property
    def met_budget(self) -> bool:
        return self.pruned_resource <= self.target_resource


def resolve_target(config: PruneConfig, resource: ResourceModel) -> int:
    """The absolute target, checked against what the search space can reach."""
    dense, minimum = resource.dense(), resource.minimum(config.uniform, config.mlp_unit)
    unit = "parameters" if resource.kind == "params" else f"MACs at {resource.seq_len} tokens"
    lo, hi = minimum / dense, 1.0
    if (config.keep is None) == (config.target is None):
        raise BudgetError("give exactly one budget: keep (a fraction, e.g. --keep 0.8) or target (--target-params N)")
    if config.keep is not None:
        if not (0.0 < config.keep < 1.0):
            raise BudgetError(f"--keep must be a fraction strictly between 0 and 1, got {config.keep}")
        target = int(math.floor(config.keep * dense))
    else:
        target = int(config.target)
        if not (0 < target < dense):
            raise BudgetError(f"target must be between 0 and the dense model's {dense:,} {unit}, got {target:,}")
    if target < minimum:
        raise BudgetError(
            f"a budget of {target:,} {unit} ({target / dense:.3f} of the model) is below what this search space can "
            f"reach: the reachable range is {minimum:,}..{dense - 1:,} {unit} (--keep in [{lo:.3f}, {hi:.0f})); "
            f"embeddings are not pruned"
        )
    return target


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student), computed in fp32."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v), dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _batch(windows: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of ``step``: a deterministic function of (seed, step), so a resumed run sees the same data."""
    n = len(windows)
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    idx = order[pos * batch_size : (pos + 1) * batch_size]
    if len(idx) < batch_size:
        idx = order[:batch_size]
    return windows[idx]


def fit_to_budget(gates: DMSGates, resource: ResourceModel, target: int) -> Structure:
    """Shift every ``a`` by the same amount (up or down) to the smallest shift whose hard structure fits
    ``target``: a structure above the budget is cut to it, one well below it gets the unused budget back."""
    base = {n: op.ratio.detach().clone() for n, op in gates.operators.items()}

    def apply(delta: float) -> Structure:
        with torch.no_grad():
            for n, op in gates.operators.items():
                op.ratio.copy_((base[n] + delta).clamp(0.0, op.max_ratio))
        return gates.hard_structure()

    lo, hi = -1.0, 1.0  # cost is non-increasing in delta; apply(1.0) is the minimum, which meets any valid target
    for _ in range(40):
        mid = (lo + hi) / 2
        if resource.of_structure(apply(mid)) <= target:
            hi = mid
        else:
            lo = mid
    if abs(hi) > 1e-6:
        logger.info("shifted every pruning ratio by %+.4f so the hard structure uses the budget", hi)
    return apply(hi)


def _fmt(x: float) -> str:
    return f"{x / 1e9:.3f}G" if x >= 1e9 else f"{x / 1e6:.2f}M"


def _enable_checkpointing(model: nn.Module) -> bool:
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        return False
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


def _disable_checkpointing(model: nn.Module) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable", None)
    if disable is not None:
        disable()


def prune(model: nn.Module, calib: torch.Tensor, config: PruneConfig, progress: bool = True) -> PruneResult:
    """Search the structure of ``model`` under ``config``'s budget on the calibration windows ``calib``
    ((num_samples, seq_len) token ids). The model is left exactly as it was, except in joint mode, where the trained
    LoRA adapters are merged into its weights, and with ``fsdp`` under several processes, where its frozen weights
    stay sharded (export from a fresh load of the same checkpoint); export the result with
    :func:`dms_llm.export`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    shape = ModelShape.from_model(model)
    resource = ResourceModel(shape, config.resource, config.macs_seq_len)
    target = resolve_target(config, resource)
    dense = resource.dense()
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.shape[1] < 2:
        raise ValueError("calib must be a (num_samples, seq_len) tensor of token ids; see dms_llm.data.calibration_windows")
    if calib.max() >= shape.vocab_size or calib.min() < 0:
        raise ValueError(f"calibration token ids must lie in [0, {shape.vocab_size}); was the right tokenizer used?")
    if config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    if config.batch_size > len(calib):
        raise ValueError(f"batch_size {config.batch_size} is larger than the {len(calib)} calibration samples")

    from accelerate.state import AcceleratorState

    # AcceleratorState is a process-wide singleton; let each search pick its own precision (process group kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    device = accelerator.device
    world = accelerator.num_processes
    if config.batch_size * world > len(calib):
        raise ValueError(f"{world} processes x batch_size {config.batch_size} exceed the {len(calib)} calibration samples")
    sharded = config.fsdp and world > 1
    if config.fsdp and config.joint:
        raise ValueError("joint mode (LoRA) with FSDP is not supported: use DDP (no --fsdp) or a single process")
    if is_dispatched(model):  # a device map (one process): the model stays where it was placed
        if world > 1:
            raise ValueError("a model dispatched with a device_map cannot be searched by several processes; use one "
                             "process (device_map) or accelerate launch without device_map (DDP/FSDP)")
        device = input_device(model)
    elif not sharded:  # FSDP moves each shard to its process's device itself
        model.to(device)
    params_state = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params_state:
        p.requires_grad_(False)
    if sharded:
        _fully_shard(model, device)
    was_training = model.training
    checkpointing = config.activation_checkpointing
    if checkpointing is None:
        checkpointing = device.type == "cuda"
    checkpointing = checkpointing and _enable_checkpointing(model)
    model.train(checkpointing)  # transformers checkpoints only in train mode; Llama has no dropout

    adapters = None
    if config.joint:  # inject LoRA before the gates, so the gate hooks sit on the adapted modules
        from .recovery import _add_lora

        adapters = _add_lora(model, config)
    gates = DMSGates(model, uniform=config.uniform, mlp_unit=config.mlp_unit, momentum=config.importance_momentum)
    lora_params = [p for p in model.parameters() if p.requires_grad] if adapters is not None else []
    groups = [{"params": list(gates.parameters()), "lr": config.lr}]
    if lora_params:
        groups.append({"params": lora_params, "lr": config.joint_lr})
    optimizer = torch.optim.Adam(groups)
    optimizer = accelerator.prepare(optimizer)
    history: list[dict] = []
    start_step, state = 0, {}
    ckpt = Path(config.checkpoint_path) if config.checkpoint_path else None
    if config.resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        gates.load_state_dict(state["gates"])
        if adapters is not None:
            load_trainable_state(model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = state["step"], state["history"]
        logger.info("resumed the search from %s at step %d", ckpt, start_step)
    stable = state.get("stable", 0) if start_step else 0

    def save(step: int) -> None:
        """Search state (gates: ratios and importances; Adam; step; log; joint mode: the LoRA weights)."""
        if ckpt is not None and accelerator.is_main_process:
            save_atomically(ckpt, {"gates": gates.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                   "history": history, "stable": stable,
                                   "lora": trainable_state(model) if adapters is not None else {}})

    decay_steps = max(1, int(config.target_decay * config.steps))
    t0, completed = time.perf_counter(), False
    try:
        with accelerator.autocast():
            if start_step == 0:
                _warmup(model, gates, calib, config, accelerator)
            bar = tqdm(range(start_step, config.steps), desc="DMS search", dynamic_ncols=True,
                       disable=not progress or not accelerator.is_main_process)
            last_structure = _key(gates.hard_structure()) if start_step else None
            for step in bar:
                t_step = time.perf_counter()
                ids = _shard(_batch(calib, step, config.batch_size * world, config.seed), accelerator).to(device)
                gates.begin_step("off")
                with torch.no_grad(), (adapters.disable_adapter() if adapters is not None else nullcontext()):
                    teacher = model(input_ids=ids, use_cache=False).logits
                gates.begin_step("soft")
                student = model(input_ids=ids, use_cache=False).logits
                kl = _kl(student, teacher)
                task = kl + (config.lm_loss_weight * _lm_loss(student, ids) if config.lm_loss_weight else 0.0)
                progress_frac = min(1.0, step / decay_steps)
                r_t = dense * (target / dense) ** progress_frac
                r_c = resource.of_gates(gates)
                res_loss = torch.clamp(torch.log(r_c / r_t), min=0.0)
                loss = task + config.resource_weight * res_loss
                if not torch.isfinite(loss):
                    where = ""
                    if ckpt is not None:  # the gates still hold the last good state: keep it
                        save(step)
                        where = f"; the state after step {step} is saved in {ckpt}"
                    raise FloatingPointError(
                        f"the search loss became {loss.item()} at step {step + 1}{where}. Try --mixed-precision no, "
                        f"a lower --lr or --resource-weight"
                    )
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                _average_gradients(gates, accelerator, lora_params)
                gates.update_importance()
                optimizer.step()
                gates.clamp_()
                del teacher, student

                structure = gates.hard_structure()
                hard = resource.of_structure(structure)
                record = {
                    "step": step + 1,
                    "loss": loss.item(),
                    "kl": kl.item(),
                    "resource": r_c.item(),
                    "target_now": float(r_t),
                    "hard_resource": hard,
                    **structure.counts(),
                    "seconds": time.perf_counter() - t_step,
                }
                history.append(record)
                line = (
                    f"step {step + 1}/{config.steps} loss {record['loss']:.4f} kl {record['kl']:.4f} "
                    f"res {_fmt(record['resource'])}/{_fmt(r_t)} hard {_fmt(hard)} (target {_fmt(target)}) "
                    f"heads {record['heads']} ch {record['channels']} attn {record['attn_blocks']} "
                    f"mlp {record['mlp_blocks']}"
                )
                if accelerator.is_main_process:
                    logger.info(line)
                bar.set_postfix_str(f"kl {record['kl']:.3f} hard {_fmt(hard)}/{_fmt(target)}")
                key = _key(structure)
                stable = stable + 1 if key == last_structure else 0
                last_structure = key
                if ckpt is not None and ((step + 1) % config.checkpoint_every == 0):
                    save(step + 1)
                if step + 1 >= decay_steps and hard <= target and stable >= config.patience:
                    logger.info("target met and structure stable for %d steps: stopping at step %d", stable, step + 1)
                    break
            bar.close()
        save(len(history))  # while the adapters are still attached, so the state holds only their weights
        completed = True
    except KeyboardInterrupt:
        if ckpt is not None:
            save(len(history))
            logger.warning("interrupted: search state of step %d saved to %s (continue with --resume)", len(history), ckpt)
        raise
    finally:
        gates.begin_step("off")
        gates.remove()  # the operators stay usable below; only the hooks go
        if adapters is not None:  # merged when the search completed, else removed: the model is as it was given
            if completed:
                adapters.merge_and_unload()
            else:
                adapters.unload()
        if checkpointing:
            _disable_checkpointing(model)
        model.train(was_training)
        for p, flag in params_state:
            p.requires_grad_(flag)

    steps_run = len(history)
    structure = fit_to_budget(gates, resource, target)
    seconds = time.perf_counter() - t0
    return PruneResult(
        structure=structure,
        resource_kind=config.resource,
        dense_resource=dense,
        target_resource=target,
        pruned_resource=resource.of_structure(structure),
        search_seconds=seconds,
        steps_run=steps_run,
        history=history,
        config=asdict(config),
        weights_updated=adapters is not None,
    )


def _fully_shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2 over the processes of ``accelerate launch``: each decoder layer is one unit, then the root. The
    frozen weights are sharded in place (the model stays sharded after the search: export from a fresh load)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    logger.info("FSDP2: %d decoder layers sharded over %d processes", len(decoder_layers(model)), dist.get_world_size())


def is_dispatched(model: nn.Module) -> bool:
    """Whether ``model`` was placed across devices with a ``device_map`` (accelerate's big-model dispatch)."""
    return len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the device of the input embeddings."""
    return model.get_input_embeddings().weight.device


def _shard(batch: torch.Tensor, accelerator) -> torch.Tensor:
    """This process's rows of a global batch (all rows in a single process)."""
    n = accelerator.num_processes
    return batch if n == 1 else batch.chunk(n)[accelerator.process_index]


def _average_gradients(gates: DMSGates, accelerator, extra_params=()) -> None:
    """Data parallel: average the mask gradients (importances) and the ``a`` gradients over processes, so every
    process takes the same step and the result equals one process on the global batch."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    tensors = [m.grad for m in gates._step_masks.values() if m.grad is not None]
    tensors += [p.grad for p in [*gates.parameters(), *extra_params] if p.grad is not None]
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(accelerator.num_processes)


def _warmup(model: nn.Module, gates: DMSGates, calib: torch.Tensor, config: PruneConfig, accelerator) -> None:
    """Initial Taylor importances from the dense model: mean of g^2 under the LM loss over a few batches.

    (The distillation loss has zero gradient at the dense model, so the warm-up uses the LM loss.)"""
    sums: dict[str, torch.Tensor] = {}
    n = max(1, config.warmup_steps)
    batches = (
        _shard(_batch(calib, i, config.batch_size * accelerator.num_processes, config.seed + 1), accelerator)
        for i in range(n)
    )
    for grads in dense_mask_gradients(model, gates, batches, accelerator):
        for name, grad in grads.items():
            sums[name] = sums.get(name, 0) + grad.pow(2)
    for name, total in sums.items():
        gates.operators[name].set_importance(total / n)


def dense_mask_gradients(model: nn.Module, gates: DMSGates, batches, accelerator=None):
    """For each batch of token ids: dL_LM/dm of every operator's mask at the dense model (all masks 1),
    averaged over processes when ``accelerator`` runs several. Weights should be frozen by the caller."""
    device = input_device(model)
    for ids in batches:
        ids = ids.to(device)
        gates.begin_step("ones")
        _lm_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
        if accelerator is not None:
            _average_gradients(gates, accelerator)
        yield {name: grad.detach().float() for name, (_, grad) in gates.mask_gradients().items()}


def _key(structure: Structure) -> list:
    return [(tuple(x.kv_heads), tuple(x.channels)) for x in structure.layers]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (all weights, or only the LoRA adapters)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a :func:`trainable_state` back into ``model`` (resume)."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            named[name].copy_(value)


def save_atomically(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
