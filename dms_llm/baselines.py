"""Peer methods in the same harness, each returning a :class:`Structure` at the same budget as DMS.

- ``taylor_uniform``: LLM-Pruner-style first-order Taylor importance (|dL/dm| of each KV group and MLP channel
  unit at the dense model, summed over calibration batches) with the same widths in every pruned layer; as in
  LLM-Pruner's recipe (layers 4..29 of 32 for Llama-7B) the first 4 and the last 2 layers are left dense.
- ``shortgpt``: ShortGPT layer removal by Block Influence, BI = 1 - cos(layer input, layer output) averaged over
  calibration tokens; the layers of lowest BI are removed until the budget is met.
- ``random_uniform``: random KV groups and channels, the same widths in every layer.

All of them prune without any weight update, as the DMS search does.
"""

from __future__ import annotations

import torch
from torch import nn

from .gates import DMSGates
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

