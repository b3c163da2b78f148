"""Run a Llama-family model one decoder layer (or one block) at a time over calibration windows.

The reconstruction and the layer-wise peers (Wanda-sp, SLEB) need the residual stream between blocks, not only the
logits: :class:`LayerRunner` holds the rotary embeddings and the causal masks (one per attention window) once and
applies a layer's attention block, MLP block or the final norm and LM head to a stream kept in fp32 (the blocks run
in the model's dtype). A block that a per-layer export removed (``None``) adds nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .structure import SANDWICH_NORM_TYPES, decoder_layers, layer_windows


class LayerRunner:
    """Block-by-block forward passes of ``model`` over ``windows`` ((num_samples, seq_len) token ids), in batches of
    ``batch_size`` windows."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 4):
        import copy

        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        self.model = model
        self.layers = decoder_layers(model)
        self.dtype = next(model.parameters()).dtype
        self.device = model.get_input_embeddings().weight.device
        self.batches = [windows[i: i + batch_size].to(self.device) for i in range(0, len(windows), batch_size)]
        one = model.get_input_embeddings()(self.batches[0][:1])  # rotary and mask broadcast over the batch
        positions = torch.arange(one.shape[1], device=self.device)[None]
        types = getattr(model.config, "layer_types", None)
        if model.config.model_type == "gemma3_text":  # one rotary embedding per attention type
            rotary = {t: model.model.rotary_emb(one, positions, t) for t in set(types)}
            self._rotary = {id(layer): rotary[t] for layer, t in zip(self.layers, types)}
        else:
            rotary = model.model.rotary_emb(one, position_ids=positions)
            self._rotary = {id(layer): rotary for layer in self.layers}
        self.sandwich = model.config.model_type in SANDWICH_NORM_TYPES
        masks = {}  # one causal mask per attention window the layers use (None: full attention)
        windows = layer_windows(model.config)
        for window in set(windows):
            config, make = model.config, create_causal_mask
            if window is not None:
                config, make = copy.copy(model.config), create_sliding_window_causal_mask
                config.sliding_window = window
            masks[window] = make(config=config, inputs_embeds=one, attention_mask=None, cache=None,
                                 position_ids=positions)
        self._masks = {id(layer): masks[w] for layer, w in zip(self.layers, windows)}

    def embed(self) -> list[torch.Tensor]:
        """The residual stream entering the first layer, one fp32 tensor per batch."""
        return [self.model.get_input_embeddings()(ids).float() for ids in self.batches]

    def attention(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the attention block of ``layer`` adds to the stream ``hidden`` (zeros when it was removed)."""
        if layer.self_attn is None:
            return torch.zeros_like(hidden)
        x = layer.input_layernorm(hidden.to(self.dtype))
        out = layer.self_attn(hidden_states=x, position_embeddings=self._rotary[id(layer)],
                              attention_mask=self._masks[id(layer)])
        out = out[0] if isinstance(out, tuple) else out
        return (layer.post_attention_layernorm(out) if self.sandwich else out).float()

    def mlp(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the MLP block of ``layer`` adds to the stream ``hidden`` (zeros when it was removed)."""
        if layer.mlp is None:
            return torch.zeros_like(hidden)
        if self.sandwich:
            x = layer.pre_feedforward_layernorm(hidden.to(self.dtype))
            return layer.post_feedforward_layernorm(layer.mlp(x)).float()
        return layer.mlp(layer.post_attention_layernorm(hidden.to(self.dtype))).float()

    def output_norm(self, layer: nn.Module, block: str):
        """What a block's output projection's result passes before it joins the stream (identity, or Gemma 3's
        post-block norm)."""
        if not self.sandwich:
            return lambda y: y
        norm = layer.post_attention_layernorm if block == "attention" else layer.post_feedforward_layernorm
        return lambda y: norm(y.to(self.dtype)).float()

    def layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The stream after the whole decoder layer."""
        hidden = hidden + self.attention(layer, hidden)
        return hidden + self.mlp(layer, hidden)

    def nll(self, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token negative log-likelihood of the final stream, and the number of predicted tokens."""
        logits = self.model.lm_head(self.model.model.norm(hidden.to(self.dtype))).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:  # Gemma's
            logits = torch.tanh(logits / cap) * cap
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        return float(loss), ids[:, 1:].numel()


def run_seeing_input(module: nn.Module, run):
    """Call ``run()``; return the first input ``module`` received meanwhile and what ``run()`` returned."""
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        value = run()
    finally:
        handle.remove()
    return seen["x"], value


__all__ = ["LayerRunner", "run_seeing_input"]
