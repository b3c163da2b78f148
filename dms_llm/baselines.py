"""Peer methods in the same harness, each returning a :class:`Structure` at the same budget as DMS.

- ``taylor_uniform``: LLM-Pruner-style first-order Taylor importance (|dL/dm| of each KV group and MLP channel
  unit at the dense model, summed over calibration batches) with the same widths in every pruned layer; as in
  LLM-Pruner's recipe (layers 4..29 of 32 for Llama-7B) the first 4 and the last 2 layers are left dense.
- ``shortgpt``: ShortGPT layer removal by Block Influence, BI = 1 - cos(layer input, layer output) averaged over
  calibration tokens; the layers of lowest BI are removed until the budget is met.
- ``random_uniform``: random KV groups and channels, the same widths in every layer.

The stronger retraining-free peers (each after its paper and official code; a "head" is a KV group — one KV head with
its query heads — where the original prunes single heads of MHA models):

- ``flap`` (An et al., AAAI 2024): fluctuation importance (WIFV: the variance of each input channel of ``o_proj`` /
  ``down_proj`` over the calibration tokens times the squared norm of its weight column; squared again for heads, as
  its code does), standardised per layer and module, ranked *globally* across layers and modules (AL-AM) with a head
  costing its parameters in channels; its own repair is the bias compensation of :func:`flap_bias`.
- ``wanda_sp`` (Wanda's structured variant as FLAP's code runs it): importance |W| x ||X|| per input channel of
  ``o_proj`` / ``down_proj`` (averaged over output rows, summed over a head), the same fraction of heads and channels
  removed in every layer, layer by layer with inputs from the already-pruned model.
- ``sleb`` (Song et al., ICML 2024): remove whole decoder layers one at a time, each time the one whose removal
  raises the calibration perplexity least.
- ``minitron_width`` (Muralidharan et al., 2024, width axis without retraining): activation importance — the L2 norm
  of a head group's attention output and the magnitude of an MLP channel's activation, averaged over the tokens of a
  sequence and L2-aggregated over sequences — with the same widths in every layer; of the head counts a stock config
  allows, the one with the lowest calibration loss at the budget is kept.

All of them prune without any weight update; FLAP's bias and dms-llm's reconstruction are repairs applied after.
"""

from __future__ import annotations

import torch
from torch import nn

from .gates import DMSGates, hard_masked
from .layerwise import LayerRunner, run_seeing_input
from .logits import OutputHead, final_hidden, next_token_loss
from .resources import ResourceModel
from .search import dense_mask_gradients, fit_to_budget
from .structure import ModelShape, Structure, decoder_layers


def _uniform_fit(model: nn.Module, importances: dict[str, torch.Tensor], target: int, mlp_unit: int) -> Structure:
    """Keep the most important units with one shared ratio per choice, raised until the budget is met."""
    gates = DMSGates(model, uniform=True, mlp_unit=mlp_unit, search_depth=False)
    try:
        for name, value in importances.items():
            gates.operators[name].set_importance(value.to(gates.operators[name].importance))
        return fit_to_budget(gates, ResourceModel(gates.shape), target)
    finally:
        gates.remove()


def _fit_spared(shape: ModelShape, importances: dict[str, torch.Tensor], target: int, mlp_unit: int,
                spared: set[int]) -> Structure:
    """Spared layers stay dense; every other layer keeps the same fraction of its KV groups and MLP units (its
    most important ones), the largest fraction that meets the budget."""
    resource = ResourceModel(shape)
    n_units = shape.intermediate_size // mlp_unit

    def build(fraction: float) -> Structure:
        structure = Structure.dense(shape)
        kh = max(1, round(fraction * shape.num_kv_heads))
        kc = max(1, round(fraction * n_units))
        for i, layer in enumerate(structure.layers):
            if i in spared:
                continue
            layer.kv_heads = sorted(importances["heads"][i].topk(kh).indices.tolist())
            units = sorted(importances["channels"][i].topk(kc).indices.tolist())
            layer.channels = [u * mlp_unit + j for u in units for j in range(mlp_unit)]
        return structure

    if resource.of_structure(build(0.0)) > target:
        raise ValueError(f"with {len(spared)} layers left dense no uniform width of the others meets {target:,} "
                         f"parameters; spare fewer layers")
    lo, hi = 0.0, 1.0  # cost grows with the fraction
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if resource.of_structure(build(mid)) <= target else (lo, mid)
    return build(lo)


def taylor_uniform(model: nn.Module, calib: torch.Tensor, target: int, mlp_unit: int = 8, batch_size: int = 1,
                   spare_first: int = 4, spare_last: int = 2) -> Structure:
    """LLM-Pruner-style: importance = |sum over calibration batches of dL/dm| per unit; the first ``spare_first``
    and last ``spare_last`` layers stay dense, the others get the same widths."""
    shape = ModelShape.from_model(model)
    if spare_first + spare_last >= shape.num_layers:
        raise ValueError(f"sparing {spare_first} + {spare_last} of {shape.num_layers} layers leaves none to prune")
    gates = DMSGates(model, mlp_unit=mlp_unit, search_depth=False)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    sums: dict[str, torch.Tensor] = {}
    try:
        batches = (calib[i : i + batch_size] for i in range(0, len(calib), batch_size))
        for grads in dense_mask_gradients(model, gates, batches):
            for name, grad in grads.items():
                sums[name] = sums.get(name, 0) + grad
    finally:
        gates.begin_step("off")
        gates.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    importances = {k: v.abs() for k, v in sums.items()}
    spared = set(range(spare_first)) | set(range(shape.num_layers - spare_last, shape.num_layers))
    if not spared:
        return _uniform_fit(model, importances, target, mlp_unit)
    return _fit_spared(shape, importances, target, mlp_unit, spared)


@torch.no_grad()
def block_influence(model: nn.Module, calib: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """ShortGPT's Block Influence of every decoder layer: mean over tokens of 1 - cos(input, output)."""
    layers = decoder_layers(model)
    totals = torch.zeros(len(layers))
    count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(idx):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            captured[idx] = (x.float(), y.float())

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for i in range(0, len(calib), batch_size):
            ids = calib[i : i + batch_size].to(device)
            model(input_ids=ids, use_cache=False)
            for idx, (x, y) in captured.items():
                totals[idx] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum().cpu()
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return totals / count


def shortgpt(model: nn.Module, calib: torch.Tensor, target: int, batch_size: int = 1) -> Structure:
    """Remove whole layers in order of increasing Block Influence until the parameter budget is met."""
    shape = ModelShape.from_model(model)
    bi = block_influence(model, calib, batch_size)
    structure = Structure.dense(shape)
    resource = ResourceModel(shape)
    for idx in torch.argsort(bi, stable=True).tolist():
        if resource.of_structure(structure) <= target:
            break
        if len(structure.kept_layers()) == 1:
            raise ValueError("ShortGPT cannot reach this budget without removing every layer")
        structure.layers[idx].kv_heads, structure.layers[idx].channels = [], []
    return structure


def random_uniform(model: nn.Module, target: int, mlp_unit: int = 8, seed: int = 0) -> Structure:
    """Random units, the same widths in every layer, at the budget."""
    shape = ModelShape.from_model(model)
    g = torch.Generator().manual_seed(seed)
    L = shape.num_layers
    importances = {
        "heads": torch.rand(L, shape.num_kv_heads, generator=g),
        "channels": torch.rand(L, shape.intermediate_size // mlp_unit, generator=g),
    }
    return _uniform_fit(model, importances, target, mlp_unit)


# -- activation statistics of the dense model ---------------------------------------------------------------------
class ChannelStats:
    """Per input channel of one projection over the calibration tokens: sum, sum of squares, count (fp64), and the
    Minitron aggregate (per sequence: mean over tokens of the magnitude; over sequences: sum of squares)."""

    def __init__(self, width: int, group: int, device):
        self.group = group  # channels per unit for the Minitron magnitude (head group width; 1 for MLP channels)
        self.s1 = torch.zeros(width, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(width, dtype=torch.float64, device=device)
        self.minitron = torch.zeros(width // group, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.s1 += x.sum((0, 1)).double()
        self.s2 += x.pow(2).sum((0, 1)).double()
        self.n += x.shape[0] * x.shape[1]
        units = x.reshape(*x.shape[:2], -1, self.group).norm(dim=-1)  # (batch, tokens, units)
        self.minitron += units.mean(1).double().pow(2).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.s1 / self.n

    @property
    def variance(self) -> torch.Tensor:
        return (self.s2 - self.n * self.mean.pow(2)) / max(self.n - 1, 1)

    @property
    def norm(self) -> torch.Tensor:
        return self.s2.clamp_min(0).sqrt()


@torch.no_grad()
def activation_stats(model: nn.Module, calib: torch.Tensor, batch_size: int = 4) -> list[dict[str, ChannelStats]]:
    """One forward pass of the dense model: the statistics of every layer's ``o_proj`` and ``down_proj`` inputs."""
    shape = ModelShape.from_model(model)
    device = next(model.parameters()).device
    stats, handles = [], []
    for layer in decoder_layers(model):
        entry = {"attention": ChannelStats(shape.num_heads * shape.head_dim, shape.heads_per_group * shape.head_dim,
                                           device),
                 "mlp": ChannelStats(shape.intermediate_size, 1, device)}
        stats.append(entry)
        for block, proj in (("attention", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            handles.append(proj.register_forward_pre_hook(lambda m, args, s=entry[block]: s.add(args[0])))
    try:
        for i in range(0, len(calib), batch_size):
            model(input_ids=calib[i: i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def _keep_top(units_by_score: list[tuple[float, int, str, int]], shape: ModelShape, resource: ResourceModel,
              target: int, mlp_unit: int) -> Structure:
    """Keep the highest-scoring units (score, layer, "heads" | "channels", index) — the longest prefix of the ranking
    whose structure fits ``target``."""
    ranked = sorted(units_by_score, key=lambda u: -u[0])

    def build(m: int) -> Structure:
        layers = [[[], []] for _ in range(shape.num_layers)]
        for _, layer, kind, index in ranked[:m]:
            if kind == "heads":
                layers[layer][0].append(index)
            else:
                layers[layer][1].extend(range(index * mlp_unit, (index + 1) * mlp_unit))
        structure = Structure.dense(shape)
        for (heads, channels), layer in zip(layers, structure.layers):
            layer.kv_heads, layer.channels = sorted(heads), sorted(channels)
        return structure

    lo, hi = 1, len(ranked)  # cost grows with m
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if resource.of_structure(build(mid)) <= target else (lo, mid - 1)
    return build(lo)


def flap(model: nn.Module, stats: list[dict[str, ChannelStats]], target: int, output_bias: bool = True) -> Structure:
    """FLAP's structure (WIFV metric, AL-AM): see the module docstring. ``output_bias``: the budget counts the
    compensation biases of every kept block (the per-layer export carries them)."""
    shape = ModelShape.from_model(model)
    r, d = shape.heads_per_group, shape.head_dim

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean()) / x.std().clamp_min(1e-12)

    units = []
    for i, layer in enumerate(decoder_layers(model)):
        w_o = layer.self_attn.o_proj.weight.detach().double().pow(2).sum(0)
        w_d = layer.mlp.down_proj.weight.detach().double().pow(2).sum(0)
        attn = standardise((stats[i]["attention"].variance * w_o).pow(2)).view(-1, r * d).mean(1)
        mlp = standardise(stats[i]["mlp"].variance * w_d)
        units += [(float(v), i, "heads", g) for g, v in enumerate(attn)]
        units += [(float(v), i, "channels", c) for c, v in enumerate(mlp)]
    return _keep_top(units, shape, ResourceModel(shape, output_bias=output_bias), target, mlp_unit=1)


@torch.no_grad()
def flap_bias(pruned: nn.Module, dense: nn.Module, structure: Structure, stats: list[dict[str, ChannelStats]]) -> None:
    """FLAP's repair: each kept ``o_proj`` / ``down_proj`` gets the bias W[:, removed] @ mean(x[removed]), the mean
    contribution of what was removed (``pruned`` must have output biases: ``build_pruned_model(...,
    output_bias=True)``). A block removed entirely has nowhere to put its bias and is not compensated."""
    shape = ModelShape.from_model(dense)
    r, d = shape.heads_per_group, shape.head_dim
    p_layers, d_layers = decoder_layers(pruned), decoder_layers(dense)
    for new, old in enumerate(structure.kept_layers()):
        layer = structure.layers[old]
        heads = torch.zeros(shape.num_kv_heads, dtype=torch.bool)
        heads[layer.kv_heads] = True
        channels = torch.zeros(shape.intermediate_size, dtype=torch.bool)
        channels[layer.channels] = True
        for removed, s, w, target in (
            (~heads.repeat_interleave(r * d), stats[old]["attention"], d_layers[old].self_attn.o_proj.weight,
             p_layers[new].self_attn),
            (~channels, stats[old]["mlp"], d_layers[old].mlp.down_proj.weight, p_layers[new].mlp),
        ):
            if target is None:
                continue
            proj = target.o_proj if hasattr(target, "o_proj") else target.down_proj
            mean = (s.mean * removed.to(s.mean.device)).to(w.dtype)
            proj.bias.copy_(proj.bias + w @ mean)


@torch.no_grad()
def wanda_sp(model: nn.Module, calib: torch.Tensor, target: int, batch_size: int = 4) -> Structure:
    """Wanda-sp: the same fraction of heads and channels per layer, the smallest that meets ``target``, chosen layer
    by layer by |W| x ||X|| with inputs from the already-pruned layers (see the module docstring)."""
    shape = ModelShape.from_model(model)
    resource = ResourceModel(shape)
    r, d, groups, width = shape.heads_per_group, shape.head_dim, shape.num_kv_heads, shape.intermediate_size

    def counts(ratio: float) -> tuple[int, int]:  # units kept per layer at a pruning ratio (as its code rounds)
        return groups - int(ratio * groups), width - int(ratio * width)

    def uniform(kh: int, kc: int) -> Structure:
        s = Structure.dense(shape)
        for layer in s.layers:
            layer.kv_heads, layer.channels = list(range(kh)), list(range(kc))
        return s

    lo, hi = 0.0, 1.0  # smallest pruning ratio whose widths meet the budget
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if resource.of_structure(uniform(*counts(mid))) <= target else (mid, hi)
    kh, kc = counts(hi)
    if min(kh, kc) < 1:
        raise ValueError(f"no uniform pruning ratio meets {target:,} parameters")
    structure = Structure.dense(shape)
    run = LayerRunner(model, calib, batch_size)
    hidden = run.embed()
    for i, layer in enumerate(run.layers):
        kept = structure.layers[i]
        for block, proj in (("attention", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            apply = getattr(run, block)
            sq = sum(run_seeing_input(proj, lambda: apply(layer, h))[0].float().pow(2).sum((0, 1)) for h in hidden)
            score = (proj.weight.detach().abs().float() * sq.sqrt()[None]).mean(0)
            if block == "attention":
                kept.kv_heads = sorted(score.view(groups, r * d).sum(1).topk(kh).indices.tolist())
            else:
                kept.channels = sorted(score.topk(kc).indices.tolist())
            with hard_masked(model, _only_layer(structure, i, shape)):  # the pruned block feeds the next one
                hidden = [h + apply(layer, h) for h in hidden]
    return structure


def _only_layer(structure: Structure, index: int, shape: ModelShape) -> Structure:
    """``structure`` for layer ``index``, every other layer dense (masks for one layer's block-by-block run)."""
    only = Structure.dense(shape)
    only.layers[index] = structure.layers[index]
    return only


@torch.no_grad()
def sleb(model: nn.Module, calib: torch.Tensor, target: int, batch_size: int = 4) -> Structure:
    """SLEB: remove the decoder layer whose removal raises the calibration perplexity least, repeat until the budget
    is met. The stream before each layer is cached, so a trial only recomputes the layers after the removed one."""
    shape = ModelShape.from_model(model)
    resource = ResourceModel(shape)
    structure = Structure.dense(shape)
    run = LayerRunner(model, calib, batch_size)
    kept = list(range(shape.num_layers))
    while resource.of_structure(structure) > target:
        if len(kept) == 1:
            raise ValueError("SLEB cannot reach this budget without removing every layer")
        streams = [run.embed()]  # streams[j]: the input of kept[j]
        for i in kept:
            streams.append([run.layer(run.layers[i], h) for h in streams[-1]])
        best = None
        for j, candidate in enumerate(kept):
            hidden = streams[j]
            for i in kept[j + 1:]:
                hidden = [run.layer(run.layers[i], h) for h in hidden]
            nll = sum(run.nll(h, ids)[0] for h, ids in zip(hidden, run.batches))
            if best is None or nll < best[0]:
                best = (nll, candidate)
        kept.remove(best[1])
        structure.layers[best[1]].kv_heads, structure.layers[best[1]].channels = [], []
    return structure


@torch.no_grad()
def minitron_width(model: nn.Module, stats: list[dict[str, ChannelStats]], calib: torch.Tensor, target: int,
                   mlp_unit: int = 1, batch_size: int = 4) -> Structure:
    """Minitron-style width pruning: activation importance (see the module docstring), the same widths in every
    layer; among the head counts a stock config accepts, the one whose structure has the lowest calibration loss."""
    shape = ModelShape.from_model(model)
    resource = ResourceModel(shape)
    heads = torch.stack([s["attention"].minitron.sqrt() for s in stats]).float()
    channels = torch.stack([s["mlp"].minitron.sqrt().view(-1, mlp_unit).sum(1) for s in stats]).float()
    n_units = shape.intermediate_size // mlp_unit
    candidates = []
    for g in shape.valid_uniform_group_counts():
        structure = Structure.dense(shape)
        for i, layer in enumerate(structure.layers):
            layer.kv_heads = sorted(heads[i].topk(g).indices.tolist())
        lo, hi = 0, n_units  # the widest MLP that fits next to g head groups
        while lo < hi:
            mid = (lo + hi + 1) // 2
            for i, layer in enumerate(structure.layers):
                units = channels[i].topk(mid).indices.tolist()
                layer.channels = sorted(u * mlp_unit + j for u in units for j in range(mlp_unit))
            lo, hi = (mid, hi) if resource.of_structure(structure) <= target else (lo, mid - 1)
        if lo < 1:
            continue
        for i, layer in enumerate(structure.layers):
            units = channels[i].topk(lo).indices.tolist()
            layer.channels = sorted(u * mlp_unit + j for u in units for j in range(mlp_unit))
        candidates.append(structure)
    if not candidates:
        raise ValueError(f"no uniform width meets {target:,} parameters")

    def loss(structure: Structure) -> float:
        device, head = next(model.parameters()).device, OutputHead(model)
        with hard_masked(model, structure):
            batches = [calib[i: i + batch_size].to(device) for i in range(0, min(len(calib), 4 * batch_size),
                                                                             batch_size)]
            return sum(float(next_token_loss(final_hidden(model, ids), head, ids, lm_weight=1.0)[0]) for ids in batches)

    return min(candidates, key=loss) if len(candidates) > 1 else candidates[0]


__all__ = ["ChannelStats", "activation_stats", "flap", "flap_bias", "minitron_width", "random_uniform", "shortgpt",
           "sleb", "taylor_uniform", "wanda_sp"]
