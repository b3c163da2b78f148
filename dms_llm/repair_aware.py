"""The repair inside the search (``PruneConfig.repair_every``, on by default: every 25 steps; docs/DESIGN.md §3).

What ships is the repaired model, but the search learns on the sliced one. Here, every ``repair_every`` steps once
the budget's target is reached, the current hard structure is sliced from the (unchanged) source weights and repaired
by the least-squares reconstruction; the repaired ``o_proj`` / ``down_proj`` weights and biases go back into the
gated model as *deltas* that forward hooks add to those projections' outputs while the gates are on. So the steps
after a repair rank units and move widths on the model the repair will make of them, while the teacher (the same
model with the gates off) stays the dense model and the source weights are never edited.

Units outside the structure of the last repair keep their source weights (their delta columns are zero); units the
structure drops are masked anyway. An earlier experiment replaced the projections' columns once, halfway through
(teacher: a separate dense copy), and scored worse at keep 0.8 (BENCHMARKS.md, 33.78 against 33.08); this refits
repeatedly, so the deltas follow the structure as it moves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .structure import ModelShape, Structure, decoder_layers


class RepairDeltas:
    """Forward hooks on every layer's ``o_proj`` and ``down_proj`` that add the last repair's change to their output
    while :attr:`active`; :meth:`remove` detaches them (the model computes what it did before). ``dtype``: what the
    deltas are kept in: the search's autocast dtype halves their memory (a full o_proj and down_proj per layer) and
    computes the same, since autocast rounds them to it anyway."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        self.model, self.dtype = model, dtype
        self.shape = ModelShape.from_model(model)
        self.layers = decoder_layers(model)
        self.deltas: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.active = False
        self._handles = [proj.register_forward_hook(self._hook)
                         for layer in self.layers for proj in (layer.self_attn.o_proj, layer.mlp.down_proj)]

    def _hook(self, module, args, output):
        delta = self.deltas.get(module) if self.active else None
        if delta is None:
            return output
        weight, bias = delta
        x = args[0]
        return output + F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def refit(self, structure: Structure, calib: torch.Tensor, config) -> None:
        """Repair ``structure`` from the source weights on ``calib`` (a :class:`ReconstructConfig` ``config``) and
        take the repaired projections as the new deltas."""
        from .exporter import build_pruned_model, kept_rows
        from .reconstruct import reconstruct

        self.active = False  # the slicing, its check and the repair's dense passes see the source model
        pruned = build_pruned_model(self.model, structure, output_bias=True)
        reconstruct(pruned, self.model, structure, calib, config, progress=False)
        new_layers = decoder_layers(pruned)
        self.deltas = {}
        for new_idx, old_idx in enumerate(structure.kept_layers()):
            source, repaired = self.layers[old_idx], new_layers[new_idx]
            q_rows, _, channels = kept_rows(structure.layers[old_idx], self.shape)
            for cols, name in ((q_rows, "self_attn.o_proj"), (channels, "mlp.down_proj")):
                if not len(cols):
                    continue
                old, new = source.get_submodule(name), repaired.get_submodule(name)
                cols = cols.to(old.weight.device)
                # the differences in fp32, kept in self.dtype (no full-size fp32 copy on the way)
                weight = torch.zeros_like(old.weight, dtype=self.dtype)
                weight[:, cols] = (new.weight.float() - old.weight.float().index_select(1, cols)).to(self.dtype)
                bias = None if new.bias is None else (new.bias.float() - (
                    0.0 if old.bias is None else old.bias.float())).to(self.dtype)
                self.deltas[old] = (weight, bias)
        self.active = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.deltas, self.active = [], {}, False


__all__ = ["RepairDeltas"]
