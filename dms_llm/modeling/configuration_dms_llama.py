"""Config of a Llama-family decoder whose layers have their own widths (written by dms-llm's per-layer export of
Llama, Mistral, Qwen2, Qwen3 and Gemma 3 text models: the features that tell these families apart are fields of the
config).

Self-contained: needs only ``transformers``, so the checkpoint loads with ``trust_remote_code=True`` on machines
without dms-llm."""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

LAYER_TYPES = ("full_attention", "sliding_attention")


@strict
class DMSLlamaConfig(LlamaConfig):
    r"""``LlamaConfig`` plus per-layer widths and the family features of the source model.

    layer_num_key_value_heads: KV heads of each layer (0 = the layer has no attention block); every KV head
        keeps ``num_attention_heads // num_key_value_heads`` query heads, so GQA stays valid.
    layer_intermediate_sizes: MLP width of each layer (0 = the layer has no MLP block).
    output_bias: every kept attention block's ``o_proj`` and MLP block's ``down_proj`` has a bias (written by
        dms-llm's reconstruction, which compensates what pruning removed).
    source_model_type: the family the weights came from (``llama``, ``mistral``, ``qwen2``, ``qwen3``,
        ``gemma3_text``).
    qkv_bias: ``q_proj``, ``k_proj`` and ``v_proj`` have biases, ``o_proj`` not (Qwen2); ``attention_bias`` (Llama's
        option) puts one on all four.
    qk_norm: an RMSNorm over each query and key head before the rotary embedding (Qwen3, Gemma 3).
    layer_types: ``full_attention`` or ``sliding_attention`` per layer; a sliding layer sees only the last
        ``sliding_window`` tokens (Mistral: all layers; Qwen2/3 with ``max_window_layers``; Gemma 3: five of six).
        ``rope_parameters`` may hold one entry per layer type (Gemma 3: a local and a global rotary embedding).
    sandwich_norms: each block's output passes its own RMSNorm before it joins the residual stream
        (``post_attention_layernorm`` after attention, ``pre_/post_feedforward_layernorm`` around the MLP: Gemma 3);
        otherwise ``post_attention_layernorm`` is the MLP's input norm (Llama).
    norm_unit_offset: RMSNorms scale by ``1 + weight`` and compute in fp32 (Gemma 3).
    embed_scale: token embeddings are multiplied by it (Gemma 3: ``sqrt(hidden_size)``; None = not scaled).
    query_pre_attn_scalar: attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` (Gemma 3; None =
        ``head_dim ** -0.5``).
    final_logit_softcapping: logits pass ``cap * tanh(logits / cap)`` (None = not capped).
    """

    model_type = "dms_llama"
    use_bidirectional_attention = False  # read by the Gemma 3 forward this model reuses; always causal here

    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    output_bias: bool = False
    source_model_type: str = "llama"
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    sandwich_norms: bool = False
    norm_unit_offset: bool = False
    embed_scale: int | float | None = None
    query_pre_attn_scalar: int | float | None = None
    final_logit_softcapping: int | float | None = None

    def __post_init__(self, **kwargs):
        n = self.num_hidden_layers
        if self.layer_num_key_value_heads is None:
            self.layer_num_key_value_heads = [self.num_key_value_heads or self.num_attention_heads] * n
        if self.layer_intermediate_sizes is None:
            self.layer_intermediate_sizes = [self.intermediate_size] * n
        if self.layer_types is None:
            self.layer_types = [LAYER_TYPES[self.sliding_window is not None]] * n
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        n = self.num_hidden_layers
        for name in ("layer_num_key_value_heads", "layer_intermediate_sizes", "layer_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs {n} entries (num_hidden_layers)")
        if any(not 0 <= k <= self.num_key_value_heads for k in self.layer_num_key_value_heads):
            raise ValueError(f"layer_num_key_value_heads must lie in [0, {self.num_key_value_heads}]")
        if any(f < 0 for f in self.layer_intermediate_sizes):
            raise ValueError("layer_intermediate_sizes must be >= 0")
        if any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"layer_types must each be one of {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")

    @property
    def layer_num_attention_heads(self) -> list[int]:
        group = self.num_attention_heads // self.num_key_value_heads
        return [k * group for k in self.layer_num_key_value_heads]

    @property
    def rope_per_layer_type(self) -> bool:
        """``rope_parameters`` holds one rotary embedding per layer type (Gemma 3's local and global ones)."""
        rope = self.rope_parameters or {}
        return all(isinstance(rope.get(t), dict) for t in set(self.layer_types))


__all__ = ["DMSLlamaConfig"]
