"""Resource model: parameters (default) or MACs of a pruned model, exact for a hard structure and
differentiable in the operators' ``a`` for the search (DESIGN.md §3).

Counted like LLM-Pruner and the DMS paper: every parameter, embeddings and norms included (a tied LM head once).
A removed attention block takes its ``input_layernorm`` with it, a removed MLP block its
``post_attention_layernorm`` (Gemma 3: each block has an input and an output norm, and takes both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gates import DMSGates
from .structure import ModelShape, Structure


@dataclass(frozen=True)
class ResourceModel:
    """Cost of a structure of ``shape``. ``kind`` is ``"params"`` or ``"macs"`` (per sequence of ``seq_len``)."""

    shape: ModelShape
    kind: str = "params"
    seq_len: int = 2048
    output_bias: bool = False  # every kept block's o_proj / down_proj has a bias (reconstructed per-layer exports)

    def __post_init__(self):
        if self.kind not in ("params", "macs"):
            raise ValueError(f"resource kind must be 'params' or 'macs', got {self.kind!r}")

    # -- per-unit costs --------------------------------------------------------------------------------------
    def _costs(self) -> dict[str, float]:
        s = self.shape
        H, d, r = s.hidden_size, s.head_dim, s.heads_per_group
        per_group_w = H * d * r * 2 + H * d * 2  # q, o  +  k, v
        per_channel_w = 3 * H
        if self.kind == "params":
            return {
                "fixed": s.vocab_size * H * (1 if s.tie_word_embeddings else 2) + H,
                "attn_fixed": H * (2 if s.sandwich_norms else 1)  # input (and Gemma's output) norm
                + (H if (s.attention_bias and s.model_type != "qwen2") or self.output_bias else 0)  # o_proj bias
                + (2 * d if s.qk_norm else 0),  # Qwen3's / Gemma 3's q_norm, k_norm
                "per_group": per_group_w + ((r + 2) * d if s.attention_bias else 0),
                "mlp_fixed": H * (2 if s.sandwich_norms else 1) + (H if s.mlp_bias or self.output_bias else 0),
                "per_channel": per_channel_w + (2 if s.mlp_bias else 0),
                "per_group_attention": 0.0,
            }
        S = self.seq_len
        return {  # multiply-accumulates of one forward pass over S tokens (causal attention)
            "fixed": S * s.vocab_size * H,
            "attn_fixed": 0.0,
            "per_group": S * per_group_w,
            "mlp_fixed": 0.0,
            "per_channel": S * per_channel_w,
            "per_group_attention": 2 * r * d * S * (S + 1) / 2,  # QK^T and AV for the r query heads of a group
        }

    def embedding_params(self) -> int:
        """The token embedding and LM head parameters (the head once when tied): what no budget prunes."""
        s = self.shape
        return s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2)

    # -- exact -----------------------------------------------------------------------------------------------
    def of_structure(self, structure: Structure) -> int:
        c = self._costs()
        total = c["fixed"]
        for layer in structure.layers:
            if layer.kv_heads:
                total += c["attn_fixed"] + len(layer.kv_heads) * (c["per_group"] + c["per_group_attention"])
            if layer.channels:
                total += c["mlp_fixed"] + len(layer.channels) * c["per_channel"]
        return int(round(total))

    def dense(self) -> int:
        return self.of_structure(Structure.dense(self.shape))

    def minimum(self, uniform: bool, mlp_unit: int = 1, kv_groups: int = 1) -> int:
        """The smallest cost the search space can reach: one layer (or one block of each kind) of ``mlp_unit``
        channels and ``kv_groups`` KV groups (uniform: at least the fewest a stock config takes)."""
        s = self.shape
        one = Structure.dense(s)
        if uniform:
            kv_groups = max(kv_groups, min(s.valid_uniform_group_counts()))
        for i, layer in enumerate(one.layers):
            layer.kv_heads = list(range(kv_groups)) if i == 0 else []
            layer.channels = list(range(mlp_unit)) if i == 0 else []
        return self.of_structure(one)

    # -- differentiable --------------------------------------------------------------------------------------
    def of_gates(self, gates: DMSGates) -> torch.Tensor:
        """Expected cost under the current ``a``s: widths count (1 - a) N units, depth gates weight each block
        by its soft mask. Its gradient reaches every ``a``; it uses fresh masks, so the Taylor importances only
        see the task loss."""
        c, s, ops = self._costs(), self.shape, gates.operators
        L = s.num_layers
        device = gates._device()
        ones = torch.ones(L, device=device)
        groups = (1 - ops["heads"].ratios()) * s.num_kv_heads if "heads" in ops else ones * s.num_kv_heads
        channels = (
            (1 - ops["channels"].ratios()) * s.intermediate_size if "channels" in ops else ones * s.intermediate_size
        )
        attn_gate = mlp_gate = ones
        if "layer_depth" in ops:
            attn_gate = mlp_gate = ops["layer_depth"].soft_mask()[0]
        if "attn_depth" in ops:
            attn_gate = ops["attn_depth"].soft_mask()[0]
        if "mlp_depth" in ops:
            mlp_gate = ops["mlp_depth"].soft_mask()[0]
        attn = c["attn_fixed"] + groups * (c["per_group"] + c["per_group_attention"])
        mlp = c["mlp_fixed"] + channels * c["per_channel"]
        return c["fixed"] + (attn_gate * attn).sum() + (mlp_gate * mlp).sum()


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of a model as stored (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total
