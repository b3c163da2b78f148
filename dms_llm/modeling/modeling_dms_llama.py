"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text) whose layers have their own widths, with
removed attention / MLP blocks absent (dms-llm per-layer export). Built from transformers' own modules, chosen by
the config's features (biases, q/k norms, norm layout and kind, embedding scale, attention windows per layer, a rotary
embedding per layer type, logit softcapping); needs only ``transformers`` (load with ``trust_remote_code=True``).
"""

import copy

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3ForCausalLM,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextModel,
    Gemma3TextScaledWordEmbedding,
)
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaMLP,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from .configuration_dms_llama import DMSLlamaConfig


def _with(config, **values):
    """A shallow copy of ``config`` with some widths replaced (used only to size one layer's modules)."""
    layer_config = copy.copy(config)
    for key, value in values.items():
        object.__setattr__(layer_config, key, value)
    return layer_config


def _norm(config: DMSLlamaConfig, dim: int) -> nn.Module:
    """Llama's RMSNorm, or Gemma's (``1 + weight``, in fp32) when the config says so."""
    return (Gemma3RMSNorm if config.norm_unit_offset else LlamaRMSNorm)(dim, eps=config.rms_norm_eps)


class DMSLlamaAttention(Qwen3Attention):
    """transformers' Qwen3 attention (Llama's, plus per-head q/k norms and the layer type's window), sized for one
    layer; without ``qk_norm`` the norms are identities, so it computes Llama's / Mistral's / Qwen2's attention."""

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
        if config.qk_norm:
            self.q_norm, self.k_norm = _norm(config, self.head_dim), _norm(config, self.head_dim)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        if config.query_pre_attn_scalar:
            self.scaling = config.query_pre_attn_scalar**-0.5


class DMSLlamaMLP(LlamaMLP):
    def __init__(self, config: DMSLlamaConfig, intermediate_size: int):
        super().__init__(_with(config, intermediate_size=intermediate_size))
        self.config = config
        if config.output_bias:
            self.down_proj = nn.Linear(self.down_proj.in_features, self.down_proj.out_features, bias=True)


class DMSLlamaDecoderLayer(GradientCheckpointingLayer):
    """A decoder layer whose attention and MLP blocks may be absent (``None``); with ``sandwich_norms`` each block's
    output is normed before it joins the stream (Gemma 3's layout and module names)."""

    def __init__(self, config: DMSLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size, self.head_dim, self.layer_idx = config.hidden_size, config.head_dim, layer_idx
        self.sandwich = config.sandwich_norms
        kv = config.layer_num_key_value_heads[layer_idx]
        width = config.layer_intermediate_sizes[layer_idx]
        self.self_attn = DMSLlamaAttention(config, layer_idx, kv) if kv else None
        self.input_layernorm = _norm(config, config.hidden_size) if kv else None
        self.mlp = DMSLlamaMLP(config, width) if width else None
        if self.sandwich:
            self.post_attention_layernorm = _norm(config, config.hidden_size) if kv else None
            self.pre_feedforward_layernorm = _norm(config, config.hidden_size) if width else None
            self.post_feedforward_layernorm = _norm(config, config.hidden_size) if width else None
        else:
            self.post_attention_layernorm = _norm(config, config.hidden_size) if width else None

    def forward(self, hidden_states, **kwargs):
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            hidden_states = hidden_states + (self.post_attention_layernorm(attn_out) if self.sandwich else attn_out)
        else:  # the KV cache has a slot per layer: fill this one with a 1 x 1 placeholder per token, so that it
            # still counts the tokens seen (positions and masks are read from the first layer's slot)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None:
                placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
                cache.update(placeholder, placeholder, self.layer_idx)
        if self.mlp is not None:
            if self.sandwich:
                mlp_out = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden_states)))
            else:
                mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
            hidden_states = hidden_states + mlp_out
        return hidden_states


class DMSLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = DMSLlamaConfig
    config: DMSLlamaConfig
    _no_split_modules = ["DMSLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": DMSLlamaDecoderLayer, "attentions": DMSLlamaAttention}

    @torch.no_grad()
    def _init_weights(self, module):
        """Llama's, plus Gemma's modules: norms start at zero (they scale by 1 + weight); the embedding scale and
        the rotary frequencies per layer type are buffers that are not saved."""
        super()._init_weights(module)
        if isinstance(module, Gemma3RMSNorm):
            init.zeros_(module.weight)
        elif isinstance(module, Gemma3TextScaledWordEmbedding):
            init.constant_(module.embed_scale, module.scalar_embed_scale)
        elif isinstance(module, Gemma3RotaryEmbedding):
            for layer_type in module.layer_types:
                rope_type = module.rope_type[layer_type]
                make = module.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[
                    rope_type]
                inv_freq, _ = make(module.config, layer_type=layer_type)
                init.copy_(getattr(module, f"{layer_type}_inv_freq"), inv_freq)
                init.copy_(getattr(module, f"{layer_type}_original_inv_freq"), inv_freq)


class DMSRotaryEmbedding(LlamaRotaryEmbedding):
    """Llama's rotary embedding, shared by every layer type (the reused forward asks for one per type)."""

    def forward(self, x, position_ids, layer_type=None):
        return super().forward(x, position_ids)


class DMSLlamaModel(DMSLlamaPreTrainedModel):
    def __init__(self, config: DMSLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        if config.embed_scale is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        else:
            self.embed_tokens = Gemma3TextScaledWordEmbedding(config.vocab_size, config.hidden_size,
                                                              self.padding_idx, embed_scale=config.embed_scale)
        self.layers = nn.ModuleList(DMSLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config, config.hidden_size)
        self.rotary_emb = (Gemma3RotaryEmbedding if config.rope_per_layer_type else DMSRotaryEmbedding)(config=config)
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, *args, **kwargs):
        # transformers' own forwards: Gemma 3's builds a mask and a rotary embedding per layer type; without
        # windows Qwen2's (Llama's, with layer types) suffices
        stock = Gemma3TextModel.forward if self.config.sliding_window is not None else Qwen2Model.forward
        return stock(self, *args, **kwargs)


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

    forward = Gemma3ForCausalLM.forward  # Llama's, with the final logit softcap when the config has one


DMSLlamaConfig.register_for_auto_class()
DMSLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["DMSLlamaForCausalLM", "DMSLlamaModel", "DMSLlamaPreTrainedModel"]
