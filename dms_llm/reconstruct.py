"""Reconstruction: repair the kept weights of a pruned model from calibration statistics (docs/DESIGN.md §6).

No gradient training. Layer by layer, in order, the output projection of every kept block (``o_proj`` for the kept
heads, ``down_proj`` for the kept MLP channels) is refit by ridge least squares so that the pruned block reproduces
what the dense block adds to the residual stream, on the pruned model's own stream:

    Z = the dense block's input to its output projection, on the stream of the already-repaired pruned model
    X = Z[:, kept]           (the pruned block computes exactly these: its q/k/v, gate/up rows are the kept slices)
    Y = Z W0^T               (what the dense block would add there)
    W = argmin ||X W^T - Y||^2 + lam ||W - W0[:, kept]||^2,   lam = ridge * mean(diag(X^T X))

so the kept channels take over what the removed ones did, as far as it is linear in them (the structured form of
the OBS / ZipLM update). Everything comes from sums over the calibration tokens, X^T X, X^T Y, the sums of X and Y and
||Y||^2, taken during one dense forward pass per block: Y is the dense block's own output there, so only the kept
features enter a product (the k x k and k x out sums, never the full width's Gram). The pruned stream then advances
by X W^T.

A block removed entirely (a layer, or the attention or MLP of one) computes nothing in the pruned model, so the first
kept block after it takes over what it added (``absorb_removed``): the removed blocks' outputs P, computed by the dense
blocks on the pruned stream as the dense model would continue it, join that block's target, Y = Z W0^T + P.
No bias is needed, so every export format carries it; removed blocks after the last kept one have nothing to take
them over (logged). Where a norm follows each block's output (Gemma 3), Y is the dense projection's own output and the
stream advances through that norm; a removed block's output cannot be folded into a normed block's target, so
there is no take-over.

The repair checks itself on calibration windows it did not fit (``check_windows``, 4 after the ``samples`` it reads):
the KL of the next-token distributions to the dense model's, sliced weights against repaired ones. A repair that
raises it is made again without the take-over (when a block took one over), and undone if that does not lower it
either. It catches a repair gone wrong, which a check per block cannot: on the DMS uniform structure at keep 0.5 (11
whole layers removed; perplexity 14,178 sliced, 15,110 repaired with take-over, 10,249 without) the take-over lowers
the held-out least-squares error of every block that takes one over (e.g. 1.35 -> 0.74 against what the dense layers
would add) while the model gets worse; the check sees it (KL 6.60 sliced, 7.58 repaired, 6.49 without take-over)
and keeps the repair without take-over (10,249). A healthy repair passes with a wide margin (DMS per-layer keep 0.8:
KL 0.61 sliced, 0.44 repaired). The check costs three forward passes over 4 windows (dense, repaired, sliced):
1.7 s of the 27.8 s repair there.

Choices we measured (SmolLM2-135M, WikiText-2; BENCHMARKS.md). Taking over removed blocks: DMS per-layer structure
at keep 0.5 (18 of 60 blocks removed) 257.5 without, 142.5 with (with an explicit solve in an experiment: 145.6; a
mean-output bias on the previous kept block instead: 199.6; take-over and bias: 147.9). At keep 0.8 (DMS per-layer
structure, none removed) targets taken from the dense model's *own* stream (so each block also corrects the drift of
the layers before it) overfit the calibration text (46.1 with 32 windows against 40.4 here); fitting an output bias
(the mean compensation FLAP uses) did not help (40.7 against 40.4), so no format gains a bias from it; choosing the
kept units by their OBS cost instead of the search's importance gained 2% for minutes of extra work (re-measured
2026-12-03 on today's search, MLP channels within the searched widths: uniform keep 0.8 34.85 against 34.79,
per-layer keep 0.5 167.5 against 144.7 — the search's ranking stays). On today's DMS
keep-0.8 structure (33.08 here): weighting each token's squared error by 1 / RMS^2 of the stream it enters (what the
next RMSNorm sees) 33.32; adding a fraction beta of the drift to the dense stream to every target 32.00 (beta 0.125),
32.11 (0.25), 33.19 (0.5), but the dense stream costs one more dense forward pass (+~50% time, past 10% of the
search), so neither is in. More windows help steadily (same structure: 32 windows 33.08 in 24.8 s, 40 windows 32.59
in 30.7 s, 60 windows 31.98 in 42.9 s); 32 keeps the repair under 10% of a default search on the CPU. The best ridge
depends on how much was removed: at keep 0.8 a ridge of 0.1 repairs better (DMS 32.14, Minitron-width 35.23), at
keep 0.5 it repairs worse (Minitron-width 190.5 -> 229.8), and the held-out check agrees both times, so the default
stays 0.01. A per-block choice by 2-fold cross-validation on the sums helped at keep 0.8 (31.81, 35.09) and hurt
Minitron-width at keep 0.5 (223.1): block errors prefer more ridge than the model does. Where a model already has
output biases, they are refit with the weights (``bias=True``).

Cost and memory: one forward pass of the dense decoder blocks over ``samples`` calibration windows, one block at a
time; the pruned stream (windows x tokens x hidden), one block's kept features and its sums (kept x kept and
kept x hidden, accumulated in fp64 from fp32 products) are held at once; the solve is a Cholesky factorisation in
fp64. Taking the sums from the kept features and the block's output, not from the full width's Gram and fp64
products with W0, cut the repair of a 1B-shaped model on the 2-core CPU from 459.8 s to 330.0 s (11.8 -> 11.0 GiB)
and SmolLM2's at keep 0.8 from 27.3 s to 24.8 s, with the same perplexity (33.08).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DMSError
from .layerwise import LayerRunner, run_seeing_input
from .logits import OutputHead, TeacherCache, final_hidden, next_token_loss
from .progress import Heartbeat
from .structure import ModelShape, Structure, decoder_layers

logger = logging.getLogger("dms_llm")


class ReconstructionError(DMSError, RuntimeError):
    """The calibration statistics cannot give a repair (non-finite values)."""


@dataclass
class ReconstructConfig:
    """Settings of the reconstruction stage: how many calibration windows it reads (None: all), the relative ridge
    term, the batch of windows per forward pass, whether output biases the pruned model has are refit too, whether
    the first kept block after a removed one also takes over what the removed block added, and how many of the
    calibration windows after those it reads check that the repair brings the model closer to the dense one (0: no
    check)."""

    samples: int | None = 32
    ridge: float = 1e-2
    batch_size: int = 4
    bias: bool = True
    absorb_removed: bool = True
    check_windows: int = 4

    def __post_init__(self):
        if self.samples is not None and self.samples < 1:
            raise DMSError(f"`samples` must be at least 1 (or None for all windows), got {self.samples}")
        if not self.ridge > 0:
            raise DMSError(f"`ridge` must be positive (it keeps the least-squares problems well posed), got "
                           f"{self.ridge}")
        if self.batch_size < 1:
            raise DMSError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if self.check_windows < 0:
            raise DMSError(f"`check_windows` must be 0 (no check) or more, got {self.check_windows}")


class _Normal:
    """Running sums over calibration tokens for one block's least squares, in fp64: X^T X, X^T Y, the sums of X and
    Y, sum ||Y||^2 and the count, for the kept features X and the target Y (what the dense block adds, plus what
    removed blocks before it would add when it takes them over)."""

    def __init__(self, width: int, out: int, device):
        self.xx = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.xy = torch.zeros(width, out, dtype=torch.float64, device=device)
        self.sx = torch.zeros(width, dtype=torch.float64, device=device)
        self.sy = torch.zeros(out, dtype=torch.float64, device=device)
        self.yy, self.n = 0.0, 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
        self.xx += (x.T @ x).double()
        self.xy += (x.T @ y).double()
        self.sx += x.sum(0).double()
        self.sy += y.sum(0).double()
        self.yy += float(y.double().pow(2).sum())
        self.n += x.shape[0]

    def finite(self) -> bool:
        return math.isfinite(self.yy) and all(bool(torch.isfinite(t).all()) for t in (self.xx, self.xy, self.sx,
                                                                                      self.sy))


def _refit(dense: nn.Linear, pruned: nn.Linear, kept: torch.Tensor, sums: _Normal, config: ReconstructConfig,
           where: str) -> dict:
    """Solve for the kept columns of ``pruned`` (and its bias) from the sums of the kept features and the target;
    see the module docstring. Returns the relative error of the fit before (sliced weights) and after."""
    if not sums.finite():
        raise ReconstructionError(
            f"{where}: the calibration statistics are not finite (the model overflows on the calibration text); load "
            f"the model in float32 (`dtype='float32'`) or turn reconstruction off (`reconstruct=False`)")
    xx_raw, xy_raw, sx, sy, yy, n = sums.xx, sums.xy, sums.sx, sums.sy, sums.yy, sums.n
    fit_bias = config.bias and pruned.bias is not None
    xx, xy = xx_raw, xy_raw
    if fit_bias:  # centre: the intercept takes the means
        xx, xy = xx - torch.outer(sx, sx) / n, xy - torch.outer(sx, sy) / n
    k = len(kept)
    lam = config.ridge * max(float(torch.diagonal(xx).mean()), 1e-12)
    start = dense.weight.detach()[:, kept.to(dense.weight.device)].to(xx.device, torch.float64)
    system = xx + lam * torch.eye(k, dtype=xx.dtype, device=xx.device)
    chol, info = torch.linalg.cholesky_ex(system)
    rhs = xy + lam * start.T
    w = (torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.lstsq(system, rhs).solution).T
    old_bias = pruned.bias.detach().double() if pruned.bias is not None else None
    b = (sy - w @ sx) / n if fit_bias else old_bias

    def error(weight, bias) -> float:  # ||X W^T + b - Y||^2 / ||Y - mean(Y)||^2, from the sums
        sse = yy - 2 * (weight * xy_raw.T).sum() + (weight @ xx_raw * weight).sum()
        if bias is not None:
            sse = sse + 2 * bias @ (weight @ sx) - 2 * bias @ sy + n * bias @ bias
        return float(sse / (yy - sy @ sy / n).clamp_min(1e-30))

    before, after = error(start, old_bias), error(w, b)
    with torch.no_grad():
        pruned.weight.copy_(w.to(pruned.weight.dtype))
        if fit_bias:
            pruned.bias.copy_(b.to(pruned.bias.dtype))
    return {"error_before": before, "error_after": after, "tokens": int(n), "features": k}


def _kept_columns(structure: Structure, index: int, block: str, shape: ModelShape) -> torch.Tensor:
    layer = structure.layers[index]
    if block == "mlp":
        return torch.tensor(layer.channels, dtype=torch.long)
    width = shape.heads_per_group * shape.head_dim
    return torch.tensor([g * width + j for g in layer.kv_heads for j in range(width)], dtype=torch.long)


@torch.no_grad()
def reconstruct(pruned: nn.Module, dense: nn.Module, structure: Structure, calib: torch.Tensor,
                config: ReconstructConfig | None = None, progress: bool = True,
                reference: TeacherCache | None = None) -> dict:
    """Refit, in place, the ``o_proj`` and ``down_proj`` weights (and their biases, where ``pruned`` has them) of
    ``pruned`` — ``dense`` sliced to ``structure`` — so each of its blocks does what the dense block does on the
    pruned model's stream, over the calibration windows ``calib`` ((num_samples, seq_len) token ids). ``dense`` is not
    changed.

    The repair checks itself on ``check_windows`` calibration windows it did not read (when ``calib`` has them): if
    the repaired model is further from the dense one there (KL of the next-token distributions) than the sliced
    model, the repair is made again without taking over removed blocks (when some were), and the sliced weights stay
    if that does not bring it closer either.

    Returns ``{"seconds", "tokens", "blocks": [{"layer", "block", "absorbs", "error_before", "error_after"}, ...],
    "check"}`` with the relative least-squares error of every refit block before (sliced weights) and after, and
    ``check`` (None without held-out windows): the held-out KL of each try and which weights were ``kept`` (the
    block errors ``after`` are those of the kept weights). ``reference``: the dense model's outputs on the check's
    windows (:func:`split_windows`), to share between repairs of several structures."""
    config = config or ReconstructConfig()
    t0 = time.perf_counter()
    windows, held_out = split_windows(calib, config)
    kept_layers = structure.kept_layers()
    if len(kept_layers) != len(decoder_layers(pruned)):
        raise DMSError(f"the pruned model has {len(decoder_layers(pruned))} layers, the structure keeps "
                       f"{len(kept_layers)}")
    sliced = [t.detach().clone() for t in _projections(pruned)] if len(held_out) else None
    report = _repair(pruned, dense, structure, windows, config, progress)
    check = None
    if sliced is not None:
        reference = reference or TeacherCache(held_out, top_k=0)
        check = {"windows": len(held_out), **_gaps(pruned, dense, sliced, reference, config.batch_size),
                 "kept": "repaired"}
        if check["repaired"] > check["sliced"] and any(r["absorbs"] for r in report):
            _restore(pruned, sliced)
            plain = dataclasses.replace(config, absorb_removed=False)
            report = _repair(pruned, dense, structure, windows, plain, progress)
            check["without_takeover"] = _gaps(pruned, dense, None, reference, config.batch_size)["repaired"]
            check["kept"] = "without take-over"
        if min(check["repaired"], check.get("without_takeover", math.inf)) > check["sliced"]:
            _restore(pruned, sliced)
            check["kept"] = "sliced"
            report = [{**r, "error_after": r["error_before"]} for r in report]  # the errors of the weights it holds
        level = logging.INFO if check["kept"] == "repaired" else logging.WARNING
        logger.log(level, "reconstruction check on %d held-out calibration windows: KL to the dense model sliced "
                   "%.4f, repaired %.4f%s -> kept the %s weights", len(held_out), check["sliced"], check["repaired"],
                   f", without take-over {check['without_takeover']:.4f}" if "without_takeover" in check else "",
                   check["kept"])
    seconds = time.perf_counter() - t0
    if report:
        before = sum(r["error_before"] for r in report) / len(report)
        after = sum(r["error_after"] for r in report) / len(report)
        logger.info("reconstruction: %d blocks refit on %d tokens in %.1f s; mean relative error %.4f -> %.4f",
                    len(report), windows.numel(), seconds, before, after)
    return {"seconds": seconds, "tokens": windows.numel(), "blocks": report, "check": check}


def split_windows(calib: torch.Tensor, config: ReconstructConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration windows the repair reads and, after them, those its check scores."""
    windows = calib[: config.samples] if config.samples else calib
    return windows, calib[len(windows): len(windows) + config.check_windows]


@torch.no_grad()
def held_out_scores(pruned: nn.Module, dense: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                    sliced: list[torch.Tensor] | None = None, reference: TeacherCache | None = None) -> dict:
    """``{"kl", "lm"}``: the mean per-token KL(dense || pruned) of the next-token distributions and ``pruned``'s
    next-token cross-entropy over ``windows`` ((N, T) token ids). Given ``sliced`` (the projections before the
    repair), also ``"kl_sliced"``: the KL of ``pruned`` with those restored. The dense model's side comes from
    ``reference`` (its final hidden states on these windows, :class:`TeacherCache` with ``top_k=0``: the exact KL),
    computed here when not given; pass one to score several models against the same windows."""
    reference = reference or TeacherCache(windows, top_k=0)
    modes, device = pruned.training, pruned.get_input_embeddings().weight.device
    pruned.eval()
    head = OutputHead(pruned)
    repaired = [t.detach().clone() for t in _projections(pruned)] if sliced is not None else None
    total = {"kl": 0.0, "lm": 0.0, **({"kl_sliced": 0.0} if sliced is not None else {})}
    beat = Heartbeat("held-out scoring, windows", len(windows))
    for i in range(0, len(windows), batch_size):
        rows = list(range(i, min(i + batch_size, len(windows))))
        reference.fill(dense, rows)
        ids, targets = windows[rows].to(device), reference.targets(rows, device)
        parts = next_token_loss(final_hidden(pruned, ids), head, ids, targets, 1.0, 1.0)[1]
        total["kl"] += float(parts["kl"]) * len(rows)
        total["lm"] += float(parts["lm"]) * len(rows)
        if sliced is not None:
            _restore(pruned, sliced)
            total["kl_sliced"] += float(next_token_loss(final_hidden(pruned, ids), head, ids, targets)[1]["kl"]) * len(
                rows)
            _restore(pruned, repaired)
        beat.tick(rows[-1] + 1)
    pruned.train(modes)
    return {k: v / len(windows) for k, v in total.items()}


def kl_to_dense(pruned: nn.Module, dense: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                reference: TeacherCache | None = None) -> float:
    """Mean per-token KL(dense || pruned) of the next-token distributions over ``windows`` ((N, T) token ids)."""
    return held_out_scores(pruned, dense, windows, batch_size, reference=reference)["kl"]


def choose_after_repair(dense: nn.Module, candidates: list[Structure], calib: torch.Tensor, held_out: torch.Tensor,
                        config: ReconstructConfig | None = None, tolerance: float | None = None,
                        precision: str = "no") -> tuple[int, list[float], nn.Module, dict, str]:
    """The choice among candidate structures made after the repair (docs/DESIGN.md §3): every candidate is sliced out
    of ``dense``, repaired by :func:`reconstruct` on ``calib`` and scored by its KL to the dense model on ``held_out``,
    windows that neither the search nor the repair read; :func:`dms_llm.search.choose_candidate` picks (the lowest KL,
    ties to the earlier candidate, unless a uniform one is within ``tolerance`` of it: the stock format). The scoring
    runs under ``precision``'s autocast ("bf16" or "no"; the repair itself stays fp32). Returns
    (the chosen index, every candidate's KL, the chosen repaired model, its repair record, why it was chosen)."""
    from .exporter import build_pruned_model
    from .search import STOCK_TOLERANCE, choose_candidate

    config = config or ReconstructConfig()
    if not candidates:
        raise DMSError("choose_after_repair needs at least one candidate structure")
    # the dense model's outputs on the held-out windows and on the repair check's are the same for every candidate
    scored, checked = TeacherCache(held_out, top_k=0), TeacherCache(split_windows(calib, config)[1], top_k=0)
    losses, kept = [], {}  # the best repaired projections so far of each format (a whole model is rebuilt once)
    for i, structure in enumerate(candidates):
        pruned = build_pruned_model(dense, structure)
        repair = reconstruct(pruned, dense, structure, calib, config, progress=False, reference=checked)
        with _autocast(dense, precision):  # long windows: one by one
            losses.append(kl_to_dense(pruned, dense, held_out, batch_size=1, reference=scored))
        logger.info("check after the repair: candidate %d of %d (%s) -> KL %.4f on %d held-out windows", i + 1,
                    len(candidates), "uniform" if structure.is_uniform() else "per-layer", losses[-1], len(held_out))
        uniform = structure.is_uniform()
        if uniform not in kept or losses[-1] < losses[kept[uniform][0]]:
            kept[uniform] = (i, [t.detach().clone() for t in _projections(pruned)], repair)
        del pruned
    index, why = choose_candidate(losses, candidates, STOCK_TOLERANCE if tolerance is None else tolerance)
    _, projections, repair = kept[candidates[index].is_uniform()]  # the choice is the best of its format
    pruned = build_pruned_model(dense, candidates[index])
    with torch.no_grad():
        _restore(pruned, projections)
    return index, losses, pruned, repair, why


def _autocast(model: nn.Module, precision: str):
    """bf16 autocast on ``model``'s device for ``precision`` "bf16", else nothing."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


REPAIR_MARGIN = 0.1  # an end of the depth range whose pre-repair loss is this much (relative) above the favourite's


def after_repair_candidates(checked: list[dict], margin: float = REPAIR_MARGIN) -> list[int]:
    """Which of the depth check's candidates (its records) the check after the repair repairs and scores: of each
    format, the one the pre-repair loss prefers, and the searched structure and the one that removes no block unless
    their pre-repair loss is more than ``margin`` above the favourite's. The pre-repair loss ranks close candidates
    poorly once repaired (docs/DESIGN.md §3: at keep 0.5 the repaired order turned over among candidates within 5%
    of each other), so the two ends of the depth range stay; one far behind (a short trial's searched structure:
    25% above) is not worth its repair."""
    picks: set[int] = set()
    for fmt in ("per-layer", "uniform"):
        mine = [i for i, c in enumerate(checked) if c["format"] == fmt]
        if mine:
            # the halving's finalists (scored on the most windows) first
            favourite = min(mine, key=lambda i: (-checked[i].get("windows", 0), checked[i]["loss"], i))
            none_removed = [i for i in mine if not any(checked[i]["removed"].values())]
            bound = (1 + margin) * checked[favourite]["loss"]
            picks |= {favourite} | {i for i in (mine[0], *none_removed[:1]) if checked[i]["loss"] <= bound}
    return sorted(picks)


def choose_after_repair_of(model: nn.Module, result, calib: torch.Tensor, held_out: torch.Tensor,
                           config: ReconstructConfig | None = None):
    """Repair the depth check's few best candidates (:func:`after_repair_candidates`) of a search ``result``
    (:class:`dms_llm.search.PruneResult`) and keep the one :func:`dms_llm.search.choose_candidate` picks on their KL
    to the dense ``model`` on ``held_out``. Returns the result naming that structure, with each candidate's
    repaired KL and why the winner won in its record, and the winner repaired (``repaired``, ``repair``)."""
    picks = after_repair_candidates(result.depth_check)
    index, losses, pruned, repair, why = choose_after_repair(model, [result.candidates[i] for i in picks], calib,
                                                             held_out, config, precision=result.precision)
    kl = dict(zip(picks, losses))
    checked = [{k: v for k, v in c.items() if k != "reason"} | {"kl_repaired": round(kl[i], 5) if i in kl else None,
                                                                 "chosen": i == picks[index]}
               for i, c in enumerate(result.depth_check)]
    checked[picks[index]]["reason"] = why
    logger.info("check after the repair on %d held-out calibration windows of %d tokens: kept candidate %d, %s (%s "
                "removed): %s", len(held_out), held_out.shape[1], picks[index] + 1, checked[picks[index]]["format"],
                ", ".join(f"{v} {k}" for k, v in checked[picks[index]]["removed"].items()), why)
    return dataclasses.replace(result, structure=result.candidates[picks[index]], depth_check=checked,
                               pruned_resource=checked[picks[index]]["resource"], repaired=pruned, repair=repair)


def _projections(model: nn.Module) -> list[torch.Tensor]:
    """The parameters the repair writes: every kept ``o_proj`` and ``down_proj`` weight (and bias)."""
    blocks = [(getattr(layer, block), name) for layer in decoder_layers(model)
              for block, name in (("self_attn", "o_proj"), ("mlp", "down_proj"))]
    return [t for module, name in blocks if module is not None for t in getattr(module, name).parameters()]


def _restore(model: nn.Module, saved: list[torch.Tensor]) -> None:
    for t, value in zip(_projections(model), saved, strict=True):
        t.copy_(value)


def _gaps(pruned: nn.Module, dense: nn.Module, sliced: list[torch.Tensor] | None, reference: TeacherCache,
          batch_size: int) -> dict:
    """The repair's own check: ``{"repaired"}`` (and, given the ``sliced`` projections, ``"sliced"``), the KL of
    ``pruned`` to ``dense`` over the windows of ``reference`` after (and before) the repair."""
    scores = held_out_scores(pruned, dense, reference.windows, batch_size, sliced, reference)
    return {"repaired": scores["kl"], **({"sliced": scores["kl_sliced"]} if sliced is not None else {})}


def _repair(pruned: nn.Module, dense: nn.Module, structure: Structure, windows: torch.Tensor,
            config: ReconstructConfig, progress: bool) -> list[dict]:
    """The layer-by-layer refit (module docstring); returns the per-block report."""
    from tqdm.auto import tqdm

    shape = ModelShape.from_model(dense)
    was_training = dense.training
    dense.eval()
    run = LayerRunner(dense, windows, config.batch_size)
    stream = run.embed()  # the pruned model's residual stream (its embeddings are the dense ones)
    pruned_layer = dict(zip(structure.kept_layers(), decoder_layers(pruned)))
    report, pending, absorbed = [], None, []  # pending: what the removed blocks since the last kept one would add
    beat = Heartbeat("reconstruction, layers", len(run.layers))
    for i in tqdm(range(len(run.layers)), desc="DMS reconstruction", disable=None if progress else True,
                  dynamic_ncols=True, leave=False):
        layer, target = run.layers[i], pruned_layer.get(i)
        for block in ("attention", "mlp"):
            module = None if target is None else (target.self_attn if block == "attention" else target.mlp)
            if module is None:  # removed: the pruned stream passes unchanged; the next kept block takes it over
                if config.absorb_removed and not run.sandwich:  # (not through a norm: Gemma 3)
                    virtual = stream if pending is None else [h + p for h, p in zip(stream, pending)]
                    outputs = [getattr(run, block)(layer, h) for h in virtual]
                    pending = outputs if pending is None else [p + o for p, o in zip(pending, outputs)]
                    absorbed.append(f"{i}.{block}")
                continue
            dense_proj = layer.self_attn.o_proj if block == "attention" else layer.mlp.down_proj
            kept = _kept_columns(structure, i, block, shape).to(stream[0].device)
            sums, features = _Normal(len(kept), dense_proj.out_features, stream[0].device), []
            for b, h in enumerate(stream):
                z, y = run_seeing_input(dense_proj, lambda: getattr(run, block)(layer, h))
                if run.sandwich:  # the target is the projection's own output, before the block's output norm
                    y = dense_proj(z).float()
                x = z[..., kept]
                sums.add(x, y if pending is None else y + pending[b])
                features.append(x)
            proj = module.o_proj if block == "attention" else module.down_proj
            report.append({"layer": i, "block": block, "absorbs": absorbed,
                           **_refit(dense_proj, proj, kept, sums, config, f"layer {i} {block}")})
            after = run.output_norm(target, block)  # identity, or Gemma 3's post-block norm
            stream = [h + after(proj(x).float()) for h, x in zip(stream, features)]
            pending, absorbed = None, []
        beat.tick(i + 1)
    if absorbed:
        logger.info("reconstruction: no kept block after %s to take over what they added", ", ".join(absorbed))
    short = [r for r in report if r["tokens"] < r["features"]]
    if short:  # one line per repair, not one per block
        logger.warning("reconstruction: %d of %d blocks had fewer calibration tokens (%d) than kept features (up to "
                       "%d); the ridge term keeps their fit close to the original weights (give more calibration "
                       "windows for a better repair)", len(short), len(report), short[0]["tokens"],
                       max(r["features"] for r in short))
    dense.train(was_training)
    return report


__all__ = ["ReconstructConfig", "ReconstructionError", "reconstruct"]
