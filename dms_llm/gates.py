"""DMS gates on a Llama-family model, inserted with hooks (DESIGN.md §2).

| choice            | units                     | applied to                                   |
| attention heads   | KV groups (MHA: heads)    | the input of ``o_proj``, per head slice        |
| MLP channels      | groups of ``mlp_unit``    | the input of ``down_proj``                   |
| attention depth   | one per layer             | the attention output: x + m_l * attn(x)      |
| MLP depth         | one per layer             | the MLP output:       x + m_l * mlp(x)       |

The model's modules and weights are never edited; :meth:`DMSGates.remove` leaves the model exactly as it was.
With ``uniform=True`` every layer keeps the same number of groups and channels and depth removes whole layers,
so the result is a stock ``LlamaForCausalLM``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from .structure import LayerStructure, ModelShape, Structure, decoder_layers
from .topk import DifferentiableTopK, round_half_up

MODES = ("soft", "hard", "off", "ones")


class MaskHooks:
    """Forward hooks that multiply heads, channels and block outputs by the masks in ``self.masks``.

    ``masks`` keys: ``heads`` (L, G), ``channels`` (L, F / unit) for any unit dividing F, ``attn_depth`` (L,),
    ``mlp_depth`` (L,); a missing key means "no gate there"."""

    def __init__(self, model: nn.Module, shape: ModelShape):
        self.shape = shape
        self.masks: dict[str, torch.Tensor] = {}
        self._handles = []
        for idx, layer in enumerate(decoder_layers(model)):
            # a block's depth gate scales what it adds to the stream: after its output norm where it has one (Gemma 3;
            # gating before an RMSNorm would be undone by it)
            attn_out, mlp_out = ((layer.post_attention_layernorm, layer.post_feedforward_layernorm)
                                 if shape.sandwich_norms else (layer.self_attn, layer.mlp))
            self._handles += [
                layer.self_attn.o_proj.register_forward_pre_hook(self._heads_hook(idx)),
                layer.mlp.down_proj.register_forward_pre_hook(self._channels_hook(idx)),
                attn_out.register_forward_hook(self._depth_hook(idx, "attn_depth")),
                mlp_out.register_forward_hook(self._depth_hook(idx, "mlp_depth")),
            ]

    def _heads_hook(self, idx):
        width = self.shape.heads_per_group * self.shape.head_dim

        def hook(module, args):
            mask = self.masks.get("heads")
            if mask is None:
                return None
            x = args[0]
            return (x * mask[idx].to(x.device, x.dtype).repeat_interleave(width),) + tuple(args[1:])

        return hook

    def _channels_hook(self, idx):
        def hook(module, args):
            mask = self.masks.get("channels")
            if mask is None:
                return None
            x, unit = args[0], self.shape.intermediate_size // mask.shape[-1]
            return (x * mask[idx].to(x.device, x.dtype).repeat_interleave(unit),) + tuple(args[1:])

        return hook

    def _depth_hook(self, idx, key):
        def hook(module, args, output):
            mask = self.masks.get(key)
            if mask is None:
                return None
            if isinstance(output, tuple):
                return (output[0] * mask[idx].to(output[0].device, output[0].dtype),) + tuple(output[1:])
            return output * mask[idx].to(output.device, output.dtype)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.masks = {}


def structure_masks(structure: Structure, shape: ModelShape, device=None) -> dict[str, torch.Tensor]:
    """0/1 masks (unit = one channel) that make a gated model compute exactly what the exported model computes."""
    L = shape.num_layers
    heads = torch.zeros(L, shape.num_kv_heads, device=device)
    channels = torch.zeros(L, shape.intermediate_size, device=device)
    attn, mlp = torch.zeros(L, device=device), torch.zeros(L, device=device)
    for i, layer in enumerate(structure.layers):
        heads[i, layer.kv_heads] = 1.0
        channels[i, layer.channels] = 1.0
        attn[i], mlp[i] = float(bool(layer.kv_heads)), float(bool(layer.channels))
    return {"heads": heads, "channels": channels, "attn_depth": attn, "mlp_depth": mlp}


@contextmanager
def hard_masked(model: nn.Module, structure: Structure):
    """Run ``model`` as if it were pruned to ``structure`` (masks instead of slicing), then restore it."""
    shape = ModelShape.from_model(model)
    hooks = MaskHooks(model, shape)
    hooks.masks = structure_masks(structure, shape, device=next(model.parameters()).device)
    try:
        yield model
    finally:
        hooks.remove()


def tensor_parallel_head_counts(shape: ModelShape, tp: int, uniform: bool = False) -> list[int]:
    """The KV-group counts a layer may keep so that tensor parallelism of size ``tp`` splits it (and, for the uniform
    format, a stock config takes it); a ValueError saying which sizes work when ``tp`` cannot split this model."""
    if tp < 1:
        raise ValueError(f"tensor_parallel must be at least 1, got {tp}")

    def counts_for(t: int) -> list[int]:
        if shape.hidden_size % t:
            return []
        counts = shape.tensor_parallel_group_counts(t)
        return [g for g in counts if g in shape.valid_uniform_group_counts()] if uniform else counts

    counts = counts_for(tp)
    if not counts:
        works = [t for t in range(1, 17) if counts_for(t)]
        raise ValueError(
            f"tensor parallelism of size {tp} cannot split this model (hidden size {shape.hidden_size}, "
            f"{shape.num_kv_heads} KV heads of {shape.heads_per_group} query heads each) at any width; sizes that "
            f"can: {', '.join(map(str, works))}")
    return counts


def nearest(values: list[int], x: int) -> int:
    """The value closest to ``x`` (the smaller one on a tie)."""
    return min(values, key=lambda v: (abs(v - x), v))


class DMSGates(nn.Module):
    """The DMS top-k operators of one model plus the hooks that apply them.

    Args:
        model: a Llama-family causal LM (see :class:`ModelShape`).
        uniform: equal widths in every layer and whole-layer removal (exports to a stock config).
        mlp_unit: MLP channels per unit (must divide ``intermediate_size``): 1 ranks every channel on its own.
        channel_multiple: hard MLP widths are rounded to a multiple of this many channels (8 keeps exported shapes
            kernel-friendly while every channel is still chosen on its own importance).
        search_heads / search_channels / search_depth: which choices to search.
        momentum: moving-average factor of the Taylor importances (0.99 in the paper).
        tensor_parallel: hard widths are rounded to what tensor parallelism of this size splits (vLLM's rule, see
            :func:`~dms_llm.structure.splits_across`): MLP widths to multiples of it, KV-group counts to the nearest
            that splits.
    """

    def __init__(
        self,
        model: nn.Module,
        uniform: bool = False,
        mlp_unit: int = 1,
        channel_multiple: int = 1,
        search_heads: bool = True,
        search_channels: bool = True,
        search_depth: bool = True,
        momentum: float = 0.99,
        tensor_parallel: int = 1,
    ):
        super().__init__()
        shape = ModelShape.from_model(model)
        self.head_counts = tensor_parallel_head_counts(shape, tensor_parallel, uniform)
        channel_multiple = math.lcm(channel_multiple, tensor_parallel, mlp_unit)
        if mlp_unit < 1 or shape.intermediate_size % mlp_unit != 0:
            raise ValueError(
                f"mlp_unit={mlp_unit} must divide intermediate_size={shape.intermediate_size}; "
                f"pick a divisor such as 1, 8 or 64 that divides it"
            )
        if channel_multiple < 1:
            raise ValueError(f"channel_multiple must be at least 1, got {channel_multiple}")
        self.shape, self.uniform, self.mlp_unit = shape, uniform, mlp_unit
        self.units_per_multiple = max(1, channel_multiple // mlp_unit)
        L = shape.num_layers
        self.operators = nn.ModuleDict()
        if search_heads:
            self.operators["heads"] = DifferentiableTopK(shape.num_kv_heads, L, uniform, 4, momentum=momentum)
        if search_channels:
            units = shape.intermediate_size // mlp_unit
            self.operators["channels"] = DifferentiableTopK(units, L, uniform, momentum=momentum)
        if search_depth:
            if uniform:
                self.operators["layer_depth"] = DifferentiableTopK(L, 1, temperature_scale=4, momentum=momentum)
            else:
                self.operators["attn_depth"] = DifferentiableTopK(L, 1, temperature_scale=4, momentum=momentum)
                self.operators["mlp_depth"] = DifferentiableTopK(L, 1, temperature_scale=4, momentum=momentum)
        device = next(model.parameters()).device
        self.to(device)
        self.hooks = MaskHooks(model, shape)
        self._step_masks: dict[str, torch.Tensor] = {}

    # -- masks ---------------------------------------------------------------------------------------------
    def begin_step(self, mode: str) -> None:
        """Compute this step's masks (once, outside any checkpointed region) and hand them to the hooks.

        Modes: ``soft`` (differentiable, the search), ``hard`` (0/1 of the current choice), ``off`` (the dense
        model, used as the teacher), ``ones`` (the dense model, but with masks that collect gradients: warm-up).
        """
        if mode not in MODES:
            raise ValueError(f"unknown gate mode {mode!r}; choose from {MODES}")
        self._step_masks = {}
        if mode == "off":
            self.hooks.masks = {}
            return
        if mode == "hard":
            self.hooks.masks = structure_masks(self.hard_structure(), self.shape, device=self._device())
            return
        for name, op in self.operators.items():
            if mode == "soft":
                mask = op.soft_mask()
                mask.retain_grad()
            else:
                mask = torch.ones(op.rows, op.num_units, device=self._device(), requires_grad=True)
            self._step_masks[name] = mask
        masks = dict(self._step_masks)
        if "layer_depth" in masks:
            masks["attn_depth"] = masks["mlp_depth"] = masks.pop("layer_depth")
        for key in ("attn_depth", "mlp_depth"):
            if key in masks:
                masks[key] = masks[key][0]
        self.hooks.masks = masks

    def mask_gradients(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(mask, dL/dmask) of the last step for every operator that received a gradient."""
        return {
            name: (mask, mask.grad)
            for name, mask in self._step_masks.items()
            if mask.grad is not None
        }

    def update_importance(self) -> None:
        """Taylor moving-average update from the task-loss gradients of the last step."""
        for name, (mask, grad) in self.mask_gradients().items():
            self.operators[name].update_importance(mask, grad)

    def clamp_(self) -> None:
        for op in self.operators.values():
            op.clamp_()

    def _device(self):
        return next(iter(self.operators.values())).ratio.device if self.operators else torch.device("cpu")

    # -- hard choice ---------------------------------------------------------------------------------------
    def kept_counts(self) -> dict[str, torch.Tensor]:
        """Hard counts per operator: MLP widths rounded to the channel multiple; in uniform mode head counts are
        snapped down to what a stock config accepts."""
        counts = {name: op.kept_counts() for name, op in self.operators.items()}
        m = self.units_per_multiple
        if m > 1 and "channels" in counts:
            c = counts["channels"]
            rounded = (round_half_up(c.double() / m) * m).long().clamp(m, self.operators["channels"].num_units)
            counts["channels"] = torch.where(c > 0, rounded, c)
        if self.uniform and "heads" in counts:
            valid = self.head_counts  # already the counts a stock config takes
            g = int(counts["heads"][0])
            snapped = max([v for v in valid if v <= g] or [min(valid)])
            counts["heads"] = torch.full_like(counts["heads"], snapped)
        elif len(self.head_counts) < self.shape.num_kv_heads and "heads" in counts:
            counts["heads"] = torch.tensor([nearest(self.head_counts, int(g)) for g in counts["heads"]],
                                            device=counts["heads"].device)
        return counts

    def hard_structure(self, counts: dict[str, torch.Tensor] | None = None) -> Structure:
        """The structure the current ``a``s (or the given kept ``counts`` per operator) and importances select."""
        shape, counts = self.shape, counts or self.kept_counts()
        L = shape.num_layers
        ops = self.operators
        heads = ops["heads"].kept_indices(counts["heads"]) if "heads" in ops else [list(range(shape.num_kv_heads))] * L
        if "channels" in ops:
            units = ops["channels"].kept_indices(counts["channels"])
            channels = [[u * self.mlp_unit + j for u in row for j in range(self.mlp_unit)] for row in units]
        else:
            channels = [list(range(shape.intermediate_size))] * L
        attn_keep = mlp_keep = [True] * L
        if "layer_depth" in ops:
            attn_keep = mlp_keep = [bool(x) for x in ops["layer_depth"].hard_mask(counts["layer_depth"])[0]]
        if "attn_depth" in ops:
            attn_keep = [bool(x) for x in ops["attn_depth"].hard_mask(counts["attn_depth"])[0]]
        if "mlp_depth" in ops:
            mlp_keep = [bool(x) for x in ops["mlp_depth"].hard_mask(counts["mlp_depth"])[0]]
        layers = [
            LayerStructure(list(heads[i]) if attn_keep[i] else [], list(channels[i]) if mlp_keep[i] else [])
            for i in range(L)
        ]
        return Structure(shape.heads_per_group, shape.head_dim, layers)

    def remove(self) -> None:
        """Detach every hook: the model computes exactly what it did before the gates were added."""
        self.hooks.remove()


__all__ = ["DMSGates", "MaskHooks", "hard_masked", "structure_masks"]
