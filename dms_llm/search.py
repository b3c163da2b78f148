"""The DMS search (docs/DESIGN.md §3): learn how many heads, channels and blocks to keep under a budget.

    L = KL(dense || gated) [+ w_lm * LM loss]  +  lambda_res * max(0, log(r_c / r_t))

Weights stay frozen; only the operators' ``a``s are trained (Adam), and the Taylor importances are updated from the
task-loss gradients of the masks. The teacher is the same model with the gates off, so no second copy is held in
memory. In joint mode LoRA adapters (peft) train together with the ``a``s (the teacher runs with the adapters
disabled) and are merged into the weights at the end. ``r_t`` decays exponentially from the dense cost to the
target over the first part of the search, then holds; the search stops at ``steps`` or once the hard structure
meets the target and has not changed for ``patience`` steps. A final common shift of every ``a`` makes the hard
structure use the budget: the returned structure always meets it.

The depth check (docs/DESIGN.md §3): removing a whole layer or block is the step the gradient sees least well (its
first-order importance underestimates what the block's removal costs), so after the search the same budget is also
spent with fewer removed blocks (3/4, 1/2, 1/4 and none of the searched removals, most important first; the widths
refit to the budget by the same common shift), each candidate is scored on the search's own loss on calibration
windows with hard masks, and the lowest wins. The all-blocks candidate is the width-only structure of the search,
so the result is never worse than it on that loss.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .errors import DMSError
from .gates import DMSGates, hard_masked, tensor_parallel_head_counts
from .logits import OutputHead, TeacherCache, final_hidden, next_token_loss
from .progress import Heartbeat
from .reconstruct import ReconstructConfig
from .repair_aware import RepairDeltas
from .resources import ResourceModel
from .structure import ModelShape, Structure, decoder_layers
from .training import (
    Trainer,
    TrainingConfig,
    add_lora,
    batch_rows,
    check_windows,
    input_device,
    load_trainable_state,
    trainable_state,
)

logger = logging.getLogger("dms_llm")

BUDGET_FIELDS = ("keep", "target", "resource", "macs_seq_len")
FORMATS = ("auto", "per-layer", "uniform")
# steps between the in-search repairs by default (PruneConfig.repair_every; 0 = off; docs/DESIGN.md §3)
REPAIR_EVERY = 25
# "auto" ships the stock (uniform) format unless per-layer scores more than this much better (relative)
STOCK_TOLERANCE = 0.01


class BudgetError(DMSError, ValueError):
    """The requested budget is outside what the search space can reach."""


@dataclass
class PruneConfig(TrainingConfig):
    """Settings of one DMS search; they validate themselves when made. Give the budget as ``keep`` (a fraction of
    the dense resource) or ``target`` (an absolute count); whether it can be reached depends on the model and is
    checked by :meth:`resolve_target`."""

    keep: float | None = None
    target: int | None = None
    mixed_precision: str = "auto"  # the search's autocast: bf16 where the device multiplies in bf16 natively
    resource: str = "params"  # or "macs" (per sequence of macs_seq_len tokens)
    macs_seq_len: int = 2048
    format: str = "auto"  # "per-layer", "uniform" (a stock checkpoint), or "auto": the better of the two (FORMATS)
    uniform: bool = False  # the same as format="uniform"
    search_depth: bool = True  # False: keep every layer and block, search widths only
    depth_check: int = 16  # calibration windows scoring the searched depth against fewer removals (0 = off)
    mlp_unit: int = 1  # MLP channels ranked together; 1 = each on its own (groups of 8 cost ~15% perplexity)
    channel_multiple: int = 8  # kept MLP widths are multiples of this (kernel-friendly shapes)
    tensor_parallel: int = 1  # widths rounded so that tensor parallelism of this size splits every layer (vLLM)
    steps: int = 200
    uniform_steps: int | None = None  # format "auto": the uniform search's steps (None: as many as `steps`)
    warmup_steps: int = 4
    batch_size: int = 1
    lr: float = 0.1
    resource_weight: float = 50.0
    lm_loss_weight: float = 1.0
    teacher_top_k: int = 64  # the dense teacher's tokens kept per position (0: exact KL from its final hidden states)
    importance_momentum: float = 0.99
    target_decay: float = 0.5
    patience: int = 10
    fsdp: bool = False  # under accelerate launch: shard the frozen weights (FSDP2, decoder layer = wrap unit)
    joint: bool = False  # also train LoRA adapters during the search, merged into the weights at the end
    joint_lr: float = 1e-4
    lora_rank: int = 16
    lora_alpha: int | None = None  # None: 2 x lora_rank
    # once the target is reached, repair the hard structure every N steps and search on the repaired projections
    # (dms_llm/repair_aware.py; 0 = off; None: REPAIR_EVERY, or off with `fsdp` / `joint`, where it cannot run)
    repair_every: int | None = None
    repair_takeover: bool = False  # with repair_every: the in-search repair also takes over removed blocks

    def __post_init__(self):
        super().__post_init__()
        if self.format not in FORMATS:
            raise DMSError(f"`format` must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.uniform and self.format == "per-layer":
            raise DMSError("`uniform=True` asks for the uniform format, `format='per-layer'` for the other: give one")
        if self.uniform:
            self.format = "uniform"
        self.uniform = self.format == "uniform"  # the search itself: uniform, or per layer (also for "auto")
        if (self.keep is None) == (self.target is None):
            raise BudgetError("give exactly one budget: `keep` (a fraction, e.g. 0.8) or `target` (an absolute count)")
        if self.keep is not None and not 0.0 < self.keep < 1.0:
            raise BudgetError(f"`keep` must be a fraction strictly between 0 and 1, got {self.keep}")
        if self.target is not None and self.target <= 0:
            raise BudgetError(f"`target` must be positive, got {self.target}")
        if self.resource not in ("params", "macs"):
            raise BudgetError(f"`resource` must be 'params' or 'macs', got {self.resource!r}")
        if self.steps < 1:
            raise DMSError(f"`steps` must be at least 1, got {self.steps}")
        if self.uniform_steps is not None and self.uniform_steps < 1:
            raise DMSError(f"`uniform_steps` must be at least 1 (or None: as many as `steps`), got "
                           f"{self.uniform_steps}")
        if self.batch_size < 1:
            raise DMSError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if self.mlp_unit < 1:
            raise DMSError(f"`mlp_unit` must be at least 1, got {self.mlp_unit}")
        if self.channel_multiple < 1:
            raise DMSError(f"`channel_multiple` must be at least 1, got {self.channel_multiple}")
        if self.tensor_parallel < 1:
            raise DMSError(f"`tensor_parallel` is a number of GPUs (1 = no constraint), got {self.tensor_parallel}")
        if self.teacher_top_k < 0:
            raise DMSError(f"`teacher_top_k` is a number of tokens (0 = the exact KL), got {self.teacher_top_k}")
        if self.depth_check < 0:
            raise DMSError(f"`depth_check` is a number of calibration windows (0 = off), got {self.depth_check}")
        if self.repair_every is None:
            self.repair_every = 0 if self.fsdp or self.joint else REPAIR_EVERY
        if self.repair_every < 0:
            raise DMSError(f"`repair_every` is a number of steps (0 = off), got {self.repair_every}")
        if self.repair_every and (self.fsdp or self.joint):
            raise DMSError("`repair_every` refits the source weights in one process: not with `fsdp` or `joint`")
        if self.fsdp and self.joint:
            raise DMSError("joint mode (LoRA) with FSDP is not supported: use DDP (no `fsdp`) or a single process")

    def resolve_target(self, resource: ResourceModel) -> int:
        """The absolute target, checked against what the search space of this model can reach."""
        try:
            kv_groups = min(tensor_parallel_head_counts(resource.shape, self.tensor_parallel, self.uniform))
        except ValueError as e:
            raise DMSError(f"`tensor_parallel={self.tensor_parallel}`: {e}") from None
        multiple = math.lcm(self.mlp_unit, self.channel_multiple, self.tensor_parallel)
        dense, minimum = resource.dense(), resource.minimum(self.uniform, multiple, kv_groups)
        unit = "parameters" if resource.kind == "params" else f"MACs at {resource.seq_len} tokens"
        target = int(math.floor(self.keep * dense)) if self.keep is not None else int(self.target)
        if target >= dense:
            raise BudgetError(f"`target` must be below the dense model's {dense:,} {unit}, got {target:,}")
        if target < minimum:
            raise BudgetError(
                f"a budget of {target:,} {unit} ({target / dense:.3f} of the model) is below what this search space "
                f"can reach: the reachable range is {minimum:,}..{dense - 1:,} {unit} (`keep` in "
                f"[{minimum / dense:.3f}, 1)); embeddings are not pruned"
            )
        return target

    def settings(self) -> dict:
        """The search settings as recorded beside an export (the budget is recorded on its own)."""
        return {k: v for k, v in asdict(self).items()
                if k not in BUDGET_FIELDS + ("checkpoint_path", "resume", "checkpoint_every")}


@dataclass
class PruneResult:
    structure: Structure
    dense_resource: int
    target_resource: int
    pruned_resource: int
    search_seconds: float
    steps_run: int
    history: list[dict] = field(default_factory=list)
    weights_updated: bool = False  # joint mode: LoRA merged into the model's weights
    depth_check: list[dict] = field(default_factory=list)  # the candidates scored after the search, chosen marked
    candidates: list[Structure] = field(default_factory=list)  # their structures, in the same order
    precision: str = "no"  # the autocast the search ran under ("no": fp32), `mixed_precision` resolved
    uniform_steps_run: int = 0  # format "auto": the steps of the uniform search run beside the per-layer one
    # with held-out windows: the winner of the check after the repair, sliced and repaired, and its repair record
    repaired: nn.Module | None = field(default=None, repr=False, compare=False)
    repair: dict | None = field(default=None, repr=False, compare=False)

    @property
    def met_budget(self) -> bool:
        return self.pruned_resource <= self.target_resource


def fit_to_budget(gates: DMSGates, resource: ResourceModel, target: int, hold: tuple[str, ...] = ()) -> Structure:
    """Shift every ``a`` (except those of the operators named in ``hold``) by the same amount (up or down) to the
    smallest shift whose hard structure fits ``target``: a structure above the budget is cut to it, one well below
    it gets the unused budget back."""
    base = {n: op.ratio.detach().clone() for n, op in gates.operators.items() if n not in hold}

    def apply(delta: float) -> Structure:
        with torch.no_grad():
            for n, ratio in base.items():
                op = gates.operators[n]
                op.ratio.copy_((ratio + delta).clamp(0.0, op.max_ratio))
        return gates.hard_structure()

    lo, hi = -1.0, 1.0  # cost is non-increasing in delta; apply(1.0) is the minimum, which meets any valid target
    for _ in range(40):
        mid = (lo + hi) / 2
        if resource.of_structure(apply(mid)) <= target:
            hi = mid
        else:
            lo = mid
    if abs(hi) > 1e-6 and not hold:
        logger.info("shifted every pruning ratio by %+.4f so the hard structure uses the budget", hi)
    return apply(hi)


DEPTH_OPERATORS = ("layer_depth", "attn_depth", "mlp_depth")
DEPTH_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.0)  # of the searched removals, tried by the depth check
DEPTH_WINDOWS = 16  # calibration windows scoring the formats of `auto` when the depth check is off


def depth_candidates(gates: DMSGates, resource: ResourceModel, target: int,
                     fractions: tuple[float, ...] = DEPTH_FRACTIONS) -> list[tuple[dict, Structure]]:
    """The searched structure at the budget, then the same budget with only ``fractions`` of its removed layers
    (uniform) or blocks (per-layer) removed — the least important ones, by the search's own ranking — and the widths
    shifted to use what is left. Returns ``({operator: blocks removed}, structure)`` pairs, distinct, each within
    ``target``; the first is the searched structure."""
    searched = {n: op.ratio.detach().clone() for n, op in gates.operators.items()}

    @torch.no_grad()
    def restore() -> None:
        for n, op in gates.operators.items():
            op.ratio.copy_(searched[n])

    first = fit_to_budget(gates, resource, target)
    depth = [n for n in DEPTH_OPERATORS if n in gates.operators]
    counts = gates.kept_counts()
    removed = {n: gates.operators[n].num_units - int(counts[n][0]) for n in depth}
    structures, seen = [(removed, first)], {tuple(removed.values())}
    for f in fractions:
        fewer = {n: int(math.floor(f * r + 0.5)) for n, r in removed.items()}
        if tuple(fewer.values()) in seen:
            continue
        seen.add(tuple(fewer.values()))
        restore()
        with torch.no_grad():
            for n, r in fewer.items():
                gates.operators[n].ratio.fill_(r / gates.operators[n].num_units)
        structure = fit_to_budget(gates, resource, target, hold=tuple(depth))
        if resource.of_structure(structure) <= target:  # else the widths cannot absorb the budget: no candidate
            structures.append((fewer, structure))
    restore()
    return structures


def task_loss(model: nn.Module, ids: torch.Tensor, teacher, lm_weight: float) -> tuple[torch.Tensor, dict]:
    """The search's task loss of ``model`` (gated, hard-masked or plain) on ``ids``: KL(dense || model) against the
    cached dense ``teacher`` targets of those windows + ``lm_weight`` * LM; and its parts ``{"kl", "lm"}``."""
    return next_token_loss(final_hidden(model, ids), OutputHead(model), ids, teacher, 1.0, lm_weight)


@torch.no_grad()
def calibration_losses(model: nn.Module, structures: list[Structure], windows: torch.Tensor,
                       lm_weight: float = 1.0, teacher: TeacherCache | None = None,
                       halving: list | None = None) -> tuple[list[float], list[int]]:
    """The search's task loss, KL(dense || pruned) + ``lm_weight`` * LM, of each structure (as hard masks on
    ``model``) averaged over ``windows`` (N, T); the dense model's outputs come from ``teacher`` (a cache over
    windows whose first N are these), or are computed once per window. Returns the losses and the windows each
    was scored on.

    ``halving`` (one label per structure, e.g. its format): successive halving. After a quarter of the windows,
    then after each doubling, only the better half of the structures still scored goes on, and the best of each
    label always does; a dropped structure's loss is its mean over the windows it saw. Every structure still in
    at the end is scored on all N windows, at about half the cost of scoring every one on all of them."""
    teacher = teacher or TeacherCache(windows, PruneConfig.teacher_top_k)
    device = input_device(model)
    n = len(structures)
    totals, seen, alive = [0.0] * n, [0] * n, list(range(n))
    cut = max(2, len(windows) // 4) if halving is not None else len(windows)
    beat = Heartbeat(f"scoring {n} candidate structures", len(windows) * n)
    work = 0
    for row in range(len(windows)):
        teacher.fill(model, [row])
        ids, targets = windows[row: row + 1].to(device), teacher.targets([row], device)
        for i in alive:
            with hard_masked(model, structures[i]):
                totals[i] += float(task_loss(model, ids, targets, lm_weight)[0])
            seen[i] += 1
            work += 1
            beat.tick(work)
        if row + 1 == cut and row + 1 < len(windows):
            ranked = sorted(alive, key=lambda i: (totals[i], i))
            best_of_label = {halving[i]: i for i in reversed(ranked)}.values()
            alive = sorted(set(ranked[:max(2, (len(ranked) + 1) // 2)]) | set(best_of_label))
            cut = min(len(windows), 2 * cut)
    return [t / max(k, 1) for t, k in zip(totals, seen)], seen


def choose_candidate(scores: list[float], structures: list[Structure],
                     tolerance: float = STOCK_TOLERANCE) -> tuple[int, str]:
    """Which candidate ships, and why: the lowest score (ties: the earlier), unless a uniform (stock-format) one scores
    within ``tolerance`` (relative) of it — the stock format loads everywhere without custom code — then that one."""
    best = min(range(len(scores)), key=lambda i: (scores[i], i))
    uniform = [i for i, s in enumerate(structures) if s.is_uniform()]
    if structures[best].is_uniform() or not uniform:
        return best, "the lowest score"
    u = min(uniform, key=lambda i: (scores[i], i))
    ratio = scores[u] / scores[best] if scores[best] > 0 else math.inf
    if ratio <= 1 + tolerance:
        return u, f"uniform (stock format) scores {ratio:.4f}x the best, within {tolerance:.0%}"
    return best, f"per-layer scores lowest; the best uniform candidate scores {ratio:.4f}x it (over {tolerance:.0%})"


def check_depth(model: nn.Module, gates: DMSGates, resource: ResourceModel, target: int, windows: torch.Tensor,
                lm_weight: float = 1.0, teacher: TeacherCache | None = None, uniform: DMSGates | None = None,
                fractions: tuple[float, ...] = DEPTH_FRACTIONS) -> tuple[Structure, list[dict], list[Structure]]:
    """The depth check: the structures of :func:`depth_candidates` (and, given ``uniform``, the gates of a uniform
    search at the same budget, its depth candidates too: ``auto``'s stock-format ones) scored on the search's loss on
    ``windows``; returns the one :func:`choose_candidate` picks, the record of every candidate (format, blocks
    removed, resource, loss, chosen) and the candidates' structures."""
    candidates = depth_candidates(gates, resource, target, fractions)
    if uniform is not None:
        candidates += depth_candidates(uniform, resource, target, fractions)
    if len(candidates) == 1:
        return candidates[0][1], [], []
    structures = [s for _, s in candidates]
    labels = ["uniform" if s.is_uniform() else "per-layer" for s in structures]
    losses, seen = calibration_losses(model, structures, windows, lm_weight, teacher, halving=labels)
    # only the candidates scored on every window compete (the halving dropped the others on fewer windows)
    full = [i for i, k in enumerate(seen) if k == len(windows)]
    pick, why = choose_candidate([losses[i] for i in full], [structures[i] for i in full])
    best = full[pick]
    record = [{"format": "uniform" if s.is_uniform() else "per-layer", "removed": removed,
               "resource": resource.of_structure(s), "loss": round(loss, 5), "windows": k, "chosen": i == best,
               **({"reason": why} if i == best else {})}
              for i, ((removed, s), loss, k) in enumerate(zip(candidates, losses, seen))]
    for r in record:
        removed = ", ".join(f"{v} {k}" for k, v in r["removed"].items())
        logger.info("depth check: %s, %s removed -> loss %.4f on %d windows%s", r["format"], removed, r["loss"],
                    r["windows"], " (chosen)" if r["chosen"] else "")
    logger.info("depth check on %d calibration windows: kept candidate %d (%s)", len(windows), best + 1, why)
    return structures[best], record, structures


def _fmt(x: float) -> str:
    return f"{x / 1e9:.3f}G" if x >= 1e9 else f"{x / 1e6:.2f}M"


def prune(model: nn.Module, calib: torch.Tensor, config: PruneConfig, progress: bool = True,
          held_out: torch.Tensor | None = None, repair=None) -> PruneResult:
    """Search the structure of ``model`` under ``config``'s budget on the calibration windows ``calib``
    ((num_samples, seq_len) token ids). The model is left exactly as it was, except in joint mode, where the trained
    LoRA adapters are merged into its weights, and with ``fsdp`` under several processes, where its frozen weights
    stay sharded (export from a fresh load of the same checkpoint); export the result with
    :func:`dms_llm.export`.

    ``held_out``: windows of the same text that ``calib`` does not hold (:func:`dms_llm.data.held_out_windows`).
    Given, the depth check's best candidates are also repaired (``repair``, a
    :class:`dms_llm.reconstruct.ReconstructConfig`) and the one closest to the dense model on them wins, as in
    ``dms-llm prune``; the result then carries it repaired (``repaired``: pass it to ``export(..., pruned=)``). The
    in-search repair (``config.repair_every``) uses ``repair`` too (None: the default settings)."""
    shape = ModelShape.from_model(model)
    resource = ResourceModel(shape, config.resource, config.macs_seq_len)
    target = config.resolve_target(resource)
    dense = resource.dense()
    check_windows(calib, shape.vocab_size)
    hint = "Try `mixed_precision='no'`, a lower `lr` or `resource_weight`."
    with Trainer(model, config, "search", hint, train_mode=False) as run:
        sharded = config.fsdp and run.world > 1
        if not sharded:  # FSDP moves each shard to its process's device itself
            run.place(model)
        model.requires_grad_(False)
        if sharded:
            _fully_shard(model, run.device)
        # LoRA goes in before the gates, so the gate hooks sit on the adapted modules
        alpha = config.lora_alpha or 2 * config.lora_rank
        adapters = add_lora(model, config.lora_rank, alpha) if config.joint else None
        gates = DMSGates(model, uniform=config.uniform, mlp_unit=config.mlp_unit,
                         channel_multiple=config.channel_multiple, search_depth=config.search_depth,
                         momentum=config.importance_momentum, tensor_parallel=config.tensor_parallel)
        # the dense model's outputs per calibration window, computed on first use: its weights are frozen (in joint
        # mode too: the teacher runs with the adapters off)
        teacher = TeacherCache(calib, config.teacher_top_k)
        completed, t0 = False, time.perf_counter()
        try:
            history = _search(model, gates, adapters, calib, teacher, config, resource, target, run, progress, sharded,
                              repair)
            completed = True
        finally:
            gates.begin_step("off")
            gates.remove()  # the operators stay usable below; only the hooks go
            if adapters is not None:  # merged when the search completed, else removed: the model is as it was given
                adapters.merge_and_unload() if completed else adapters.unload()
        # the depth check compares against the dense model: not after joint training (its weights changed) or
        # on weights sharded over processes
        auto = config.format == "auto" and not config.joint and not sharded
        uniform, uniform_steps = (_uniform_search(model, calib, teacher, config, resource, target, run, progress,
                                                  repair) if auto else (None, 0))
        if (config.depth_check or auto) and not config.joint and not sharded:
            with run.accelerator.autocast():  # the search's own loss, at the search's precision
                structure, checked, candidates = check_depth(
                    model, gates, resource, target, calib[:config.depth_check or DEPTH_WINDOWS],
                    config.lm_loss_weight, teacher, uniform=uniform,
                    fractions=DEPTH_FRACTIONS if config.depth_check else ())
        else:
            structure, checked, candidates = fit_to_budget(gates, resource, target), [], []
        seconds = time.perf_counter() - t0
        precision = run.precision
    result = PruneResult(
        structure=structure, dense_resource=dense, target_resource=target,
        pruned_resource=resource.of_structure(structure), search_seconds=seconds,
        steps_run=len(history), history=history, weights_updated=adapters is not None, depth_check=checked,
        candidates=candidates, precision=precision, uniform_steps_run=uniform_steps,
    )
    if held_out is None or len(result.candidates) < 2:
        return result
    from .reconstruct import choose_after_repair_of

    return choose_after_repair_of(model, result, calib, held_out, repair)


def _search(model, gates: DMSGates, adapters, calib, teacher: TeacherCache, config: PruneConfig,
            resource: ResourceModel, target: int, run: Trainer, progress: bool, sharded: bool,
            repair_settings=None) -> list[dict]:
    """The DMS steps, from the warm-up (or the saved state) to the stop; ``sharded``: FSDP over several processes;
    ``repair_settings``: the in-search repair's :class:`ReconstructConfig` (None: the defaults), the final one's."""
    lora_params = [p for p in model.parameters() if p.requires_grad] if adapters is not None else []
    groups = [{"params": list(gates.parameters()), "lr": config.lr}]
    if lora_params:
        groups.append({"params": lora_params, "lr": config.joint_lr})
    optimizer = run.prepare(torch.optim.Adam(groups))
    dense = resource.dense()
    history: list[dict] = []
    state = run.resume_state()
    if state is not None:
        gates.load_state_dict(state["gates"])
        if adapters is not None:
            load_trainable_state(model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
    else:
        with run.accelerator.autocast():
            _warmup(model, gates, calib, config, run)
    tracker = {"stable": state.get("stable", 0) if state else 0,
               "last": _key(gates.hard_structure()) if state else None, "t": time.perf_counter()}
    decay_steps = max(1, int(config.target_decay * config.steps))
    teacher_mode = adapters.disable_adapter if adapters is not None else nullcontext
    # the deltas in the autocast's dtype, which its matmuls round them to anyway
    delta_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.precision, torch.float32)
    deltas = RepairDeltas(model, delta_dtype) if config.repair_every else None

    def repair(structure: Structure) -> None:
        tracker["repaired"] = structure
        with torch.autocast(run.device.type, enabled=False):
            deltas.refit(structure, calib, replace(repair_settings or ReconstructConfig(),
                                                   absorb_removed=config.repair_takeover))

    tracker["repaired"] = None
    if deltas is not None and state is not None and state.get("repaired"):
        repair(Structure.from_dict(state["repaired"]))  # the saved run searched on this repair: so does the rest

    def dms_loss(step: int):
        """KL(dense || gated) + w_lm * LM  +  lambda * max(0, log(r_c / r_t))."""
        tracker["t"] = time.perf_counter()
        rows = run.rows(len(calib), step, config.batch_size, config.seed)
        gates.begin_step("off")
        if deltas is not None:
            deltas.active = False  # the teacher is the dense model
            if step >= decay_steps and (step - decay_steps) % config.repair_every == 0:
                structure = gates.hard_structure()
                repair(structure)
                logger.info("step %d: searching on the repair of %s", step + 1, structure.summary())
        # sharded weights: each forward is a collective, so every process fills the whole global batch (the same
        # windows in the same order); otherwise each fills only its own rows
        teacher.fill(model, batch_rows(len(calib), step, config.batch_size * run.world, config.seed)
                     if sharded else rows, teacher_mode)
        if deltas is not None:
            deltas.active = bool(deltas.deltas)
        gates.begin_step("soft")
        ids = calib[rows].to(run.device)
        task, parts = task_loss(model, ids, teacher.targets(rows, run.device), config.lm_loss_weight)
        kl = parts["kl"]
        r_t = dense * (target / dense) ** min(1.0, step / decay_steps)  # exponential decay to the target, then hold
        r_c = resource.of_gates(gates)
        return task + config.resource_weight * torch.clamp(torch.log(r_c / r_t), min=0.0), {"kl": kl, "r_c": r_c,
                                                                                             "r_t": r_t}

    def dms_update(step: int, loss: torch.Tensor, parts: dict) -> dict:
        """Taylor importances from the task gradients of the masks, then the Adam step on the ``a``s."""
        masks = [m.grad for m in gates._step_masks.values()]
        run.average_gradients(masks + [p.grad for p in [*gates.parameters(), *lora_params]])
        gates.update_importance()
        optimizer.step()
        gates.clamp_()
        structure = gates.hard_structure()
        hard = resource.of_structure(structure)
        key = _key(structure)
        tracker["stable"] = tracker["stable"] + 1 if key == tracker["last"] else 0
        tracker["last"] = key
        record = {"step": step + 1, "loss": loss.item(), "kl": parts["kl"].item(), "resource": parts["r_c"].item(),
                  "target_now": float(parts["r_t"]), "hard_resource": hard, **structure.counts(),
                  "seconds": time.perf_counter() - tracker["t"]}
        if run.is_main:
            logger.log(run.log_every(step),
                       "step %d/%d loss %.4f kl %.4f res %s/%s hard %s (target %s) heads %d ch %d attn %d mlp %d",
                       step + 1, config.steps, record["loss"], record["kl"], _fmt(record["resource"]),
                       _fmt(record["target_now"]), _fmt(hard), _fmt(target), record["heads"], record["channels"],
                       record["attn_blocks"], record["mlp_blocks"])
        return record

    def stable_and_met(step: int, record: dict) -> bool:
        done = step + 1 >= decay_steps and record["hard_resource"] <= target and tracker["stable"] >= config.patience
        if done:
            logger.info("target met and structure stable for %d steps: stopping at step %d", tracker["stable"],
                        step + 1)
        return done

    def state_fn(step: int) -> dict:
        """Gates (ratios and importances), Adam, step, log; joint mode: the LoRA weights; the in-search repair: the
        structure it last repaired."""
        return {"gates": gates.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "history": history,
                "stable": tracker["stable"], "lora": trainable_state(model) if adapters is not None else {},
                "repaired": tracker["repaired"].to_dict() if tracker["repaired"] is not None else None}

    try:
        return run.run(config.steps, history, dms_loss, dms_update, state_fn, stable_and_met,
                       postfix=lambda r: f"kl {r['kl']:.3f} hard {_fmt(r['hard_resource'])}/{_fmt(target)}",
                       progress=progress)
    finally:
        if deltas is not None:
            deltas.remove()


def uniform_state_path(path: str | None) -> str | None:
    """Where ``auto``'s uniform search keeps its resumable state, beside the per-layer search's ``path``."""
    return None if path is None else str(Path(path).with_name(Path(path).name + ".uniform"))


def _uniform_search(model: nn.Module, calib: torch.Tensor, teacher: TeacherCache, config: PruneConfig,
                    resource: ResourceModel, target: int, run: Trainer, progress: bool,
                    repair_settings=None) -> tuple[DMSGates, int]:
    """``auto``'s stock-format candidates: a second search, of uniform widths (every layer the same head groups and
    MLP width; layers may go) under the same budget, with the same teacher (its cached outputs reused). A uniform
    structure read off the per-layer search's ranking scored worse once repaired (BENCHMARKS.md: 154.8 vs 140.2 at
    keep 0.5, the same widths), so the uniform ranking is learned at uniform widths, for ``uniform_steps`` (by
    default as many as the per-layer search's: with half as many, auto scored 146.06 against uniform's 140.17 at
    keep 0.5, BENCHMARKS.md). Returns its gates (hooks removed, operators kept for the depth candidates) and its
    steps; its state resumes from :func:`uniform_state_path`."""
    steps = config.uniform_steps or config.steps
    uniform_config = replace(config, format="uniform", steps=steps,
                             checkpoint_path=uniform_state_path(config.checkpoint_path))
    gates = DMSGates(model, uniform=True, mlp_unit=config.mlp_unit, channel_multiple=config.channel_multiple,
                     search_depth=config.search_depth, momentum=config.importance_momentum,
                     tensor_parallel=config.tensor_parallel)
    logger.info("format auto: the uniform (stock-format) search at the same budget")
    try:
        with run.stage("search (uniform)", uniform_config.checkpoint_path):
            history = _search(model, gates, None, calib, teacher, uniform_config, resource, target, run, progress,
                              False, repair_settings)
    finally:
        gates.begin_step("off")
        gates.remove()
    logger.info("uniform search: %d steps; %s", len(history), fit_to_budget(gates, resource, target).summary())
    return gates, len(history)


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


def _warmup(model: nn.Module, gates: DMSGates, calib: torch.Tensor, config: PruneConfig, run: Trainer) -> None:
    """Initial Taylor importances from the dense model: mean of g^2 under the LM loss over a few batches.

    (The distillation loss has zero gradient at the dense model, so the warm-up uses the LM loss.)"""
    sums: dict[str, torch.Tensor] = {}
    n = max(1, config.warmup_steps)
    batches = (run.batch(calib, i, config.batch_size, config.seed + 1) for i in range(n))
    for grads in dense_mask_gradients(model, gates, batches, run):
        for name, grad in grads.items():
            sums[name] = sums.get(name, 0) + grad.pow(2)
    for name, total in sums.items():
        gates.operators[name].set_importance(total / n)


def dense_mask_gradients(model: nn.Module, gates: DMSGates, batches, run: Trainer | None = None):
    """For each batch of token ids: dL_LM/dm of every operator's mask at the dense model (all masks 1),
    averaged over processes when ``run`` has several. Weights should be frozen by the caller."""
    device = input_device(model)
    for ids in batches:
        ids = ids.to(device)
        gates.begin_step("ones")
        next_token_loss(final_hidden(model, ids), OutputHead(model), ids, lm_weight=1.0)[0].backward()
        if run is not None:
            run.average_gradients([m.grad for m in gates._step_masks.values()])
        yield {name: grad.detach().float() for name, (_, grad) in gates.mask_gradients().items()}


def _key(structure: Structure) -> list:
    return [(tuple(x.kv_heads), tuple(x.channels)) for x in structure.layers]


__all__ = ["BudgetError", "PruneConfig", "PruneResult", "calibration_losses", "check_depth", "depth_candidates",
           "fit_to_budget", "prune", "uniform_state_path"]
