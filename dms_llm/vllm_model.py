"""dms-llm's per-layer export as a vLLM model (registered by :mod:`dms_llm.vllm_plugin`; imported by vLLM only).

vLLM's Llama model with one decoder layer per kept layer, each built from vLLM's own attention and MLP at that
layer's widths: ``layer_num_key_value_heads[i]`` KV heads (and as many query heads per KV head as the source), an
MLP of ``layer_intermediate_sizes[i]`` channels, a width of 0 meaning the block is absent; biases on ``o_proj`` /
``down_proj`` where the export carries the repair's, Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Mistral's
and Qwen's sliding windows per layer (``layer_types``). vLLM's KV-cache manager sizes each attention layer from its
own KV heads; a layer without attention has no cache.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index

from .vllm_plugin import check_servable, check_tensor_parallel


class DMSAttention(LlamaAttention):
    """vLLM's Llama attention with this layer's head counts, and Qwen3's per-head RMSNorm of q and k before the
    rotary embedding when the export has them (``qk_norm``)."""

    def __init__(self, config, num_kv_heads: int, cache_config, quant_config, prefix: str):
        group = config.num_attention_heads // config.num_key_value_heads
        super().__init__(
            config=config,
            hidden_size=config.hidden_size,
            num_heads=num_kv_heads * group,
            num_kv_heads=num_kv_heads,
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            quant_config=quant_config,
            bias=bool(config.attention_bias or config.qkv_bias),
            bias_o_proj=bool(config.attention_bias or config.output_bias),
            cache_config=cache_config,
            prefix=prefix,
        )
        self.qk_norm = bool(config.qk_norm)
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class DMSMLP(LlamaMLP):
    """vLLM's Llama MLP at this layer's width; ``down_proj`` carries a bias where the export has the repair's."""

    def __init__(self, config, width: int, quant_config, prefix: str):
        bias = bool(getattr(config, "mlp_bias", False))
        super().__init__(hidden_size=config.hidden_size, intermediate_size=width, hidden_act=config.hidden_act,
                         quant_config=quant_config, bias=bias, prefix=prefix)
        if config.output_bias and not bias:
            self.down_proj = RowParallelLinear(input_size=width, output_size=config.hidden_size, bias=True,
                                               quant_config=quant_config, prefix=f"{prefix}.down_proj")


def _add_and_norm(norm: nn.Module, hidden_states: torch.Tensor, residual: torch.Tensor | None):
    """vLLM's fused residual add + RMSNorm, also for the first block of the model (no residual yet)."""
    if residual is None:
        return norm(hidden_states), hidden_states
    return norm(hidden_states, residual)


class DMSDecoderLayer(nn.Module):
    """One kept layer; its attention or MLP block may be absent (``None``)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        i = extract_layer_index(prefix)
        kv, width = config.layer_num_key_value_heads[i], config.layer_intermediate_sizes[i]
        self.self_attn = (DMSAttention(config, kv, vllm_config.cache_config, quant_config, f"{prefix}.self_attn")
                          if kv else None)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if kv else None
        self.mlp = DMSMLP(config, width, quant_config, f"{prefix}.mlp") if width else None
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if width else None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs):
        if self.self_attn is not None:
            hidden_states, residual = _add_and_norm(self.input_layernorm, hidden_states, residual)
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        if self.mlp is not None:
            hidden_states, residual = _add_and_norm(self.post_attention_layernorm, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class DMSLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's ``LlamaForCausalLM`` (embedding, final norm, LM head, weight loading) over :class:`DMSDecoderLayer`s.
    Stops at load, with what to do, on an export it cannot compute or a tensor-parallel size that cannot split it."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        check_servable(config)
        check_tensor_parallel(config, get_tensor_model_parallel_world_size())
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=DMSDecoderLayer)

    def load_weights(self, weights):
        if self.config.tie_word_embeddings:  # the LM head is the embedding; a saved copy of it is not loaded
            weights = ((name, w) for name, w in weights if not name.startswith("lm_head."))
        return super().load_weights(weights)
