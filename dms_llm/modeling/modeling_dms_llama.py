"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) whose layers have their own widths, with removed attention
/ MLP blocks absent (dms-llm per-layer export). Built from transformers' own modules, chosen by the config's
features (biases, q/k norms, sliding window); needs only ``transformers`` (load with ``trust_remote_code=True``).
"""

import copy

from torch import nn
from transformers import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaMLP,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.mistral.modeling_mistral import MistralModel
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from .configuration_dms_llama import DMSLlamaConfig


def _with(config, **values):
    """A shallow copy of ``config`` with some widths replaced (used only to size one layer's modules)."""
    layer_config = copy.copy(config)
    for key, value in values.items():
        object.__setattr__(layer_config, key, value)
    return layer_config


class DMSLlamaAttention(Qwen3Attention):
    """transformers' Qwen3 attention (Llama's, plus per-head q/k norms and a sliding window), sized for one layer;
    without ``qk_norm`` the norms are identities, so it computes Llama's / Mistral's / Qwen2's attention."""

    def __init__(self, config: DMSLlamaConfig, layer_idx: int, num_kv_heads: int):
        group = config.num_attention_heads // config.num_key_value_heads
        super().__init__(
            _with(config, num_attention_heads=num_kv_heads * group, num_key_value_heads=num_kv_heads), layer_idx
        )
        self.config = config  # share the model's config (attention implementation switches apply here too)
        q, kv = self.q_proj.out_features, self.k_proj.out_features
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, q, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv, bias=qkv_bias)
        self.o_proj = nn.Linear(q, config.hidden_size, bias=config.attention_bias or config.output_bias)
        if not config.qk_norm:
            self.q_norm = self.k_norm = nn.Identity()
        self.sliding_window = config.sliding_window


class DMSLlamaMLP(LlamaMLP):
    def __init__(self, config: DMSLlamaConfig, intermediate_size: int):
        super().__init__(_with(config, intermediate_size=intermediate_size))
        self.config = config
        if config.output_bias:
            self.down_proj = nn.Linear(self.down_proj.in_features, self.down_proj.out_features, bias=True)


class DMSLlamaDecoderLayer(GradientCheckpointingLayer):
    """A decoder layer whose attention and MLP blocks may be absent (``None``)."""

    def __init__(self, config: DMSLlamaConfig, layer_idx: int, attention_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        kv = config.layer_num_key_value_heads[layer_idx]
        width = config.layer_intermediate_sizes[layer_idx]
        self.self_attn = DMSLlamaAttention(config, attention_idx, kv) if kv else None
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if kv else None
        self.mlp = DMSLlamaMLP(config, width) if width else None
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if width else None

    def forward(self, hidden_states, **kwargs):
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            hidden_states = hidden_states + attn_out
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DMSLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = DMSLlamaConfig
    config: DMSLlamaConfig
    _no_split_modules = ["DMSLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": DMSLlamaDecoderLayer, "attentions": DMSLlamaAttention}


class DMSLlamaModel(DMSLlamaPreTrainedModel):
    def __init__(self, config: DMSLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        # the KV cache is indexed by attention layer: number the layers that have attention 0, 1, 2, ...
        attention_idx, layers = 0, []
        for i in range(config.num_hidden_layers):
            layers.append(DMSLlamaDecoderLayer(config, i, attention_idx))
            attention_idx += 1 if config.layer_num_key_value_heads[i] else 0
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    forward = MistralModel.forward  # Llama's, with Mistral's sliding-window mask when the config has a window


class DMSLlamaForCausalLM(DMSLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = LlamaForCausalLM._tied_weights_keys
    _tp_plan = LlamaForCausalLM._tp_plan
    _pp_plan = LlamaForCausalLM._pp_plan

    def __init__(self, config: DMSLlamaConfig):
        super().__init__(config)
        self.model = DMSLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    forward = LlamaForCausalLM.forward


DMSLlamaConfig.register_for_auto_class()
DMSLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["DMSLlamaForCausalLM", "DMSLlamaModel", "DMSLlamaPreTrainedModel"]
