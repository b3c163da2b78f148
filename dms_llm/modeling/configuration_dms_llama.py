"""Config of a Llama-family decoder whose layers have their own widths (written by dms-llm's per-layer export of
Llama, Mistral, Qwen2 and Qwen3 models: the features that tell these families apart are fields of the config).

Self-contained: needs only ``transformers``, so the checkpoint loads with ``trust_remote_code=True`` on machines
without dms-llm."""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class DMSLlamaConfig(LlamaConfig):
    r"""``LlamaConfig`` plus per-layer widths.

    layer_num_key_value_heads: KV heads of each layer (0 = the layer has no attention block); every KV head
        keeps ``num_attention_heads // num_key_value_heads`` query heads, so GQA stays valid.
    layer_intermediate_sizes: MLP width of each layer (0 = the layer has no MLP block).
    output_bias: every kept attention block's ``o_proj`` and MLP block's ``down_proj`` has a bias (written by
        dms-llm's reconstruction, which compensates what pruning removed).
    source_model_type: the family the weights came from (``llama``, ``mistral``, ``qwen2``, ``qwen3``).
    qkv_bias: ``q_proj``, ``k_proj`` and ``v_proj`` have biases, ``o_proj`` not (Qwen2); ``attention_bias`` (Llama's
        option) puts one on all four.
    qk_norm: an RMSNorm over each query and key head before the rotary embedding (Qwen3).
    sliding_window: every attention block sees only the last ``sliding_window`` tokens (Mistral; None = full).
    """

    model_type = "dms_llama"

    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    output_bias: bool = False
    source_model_type: str = "llama"
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

    def __post_init__(self, **kwargs):
        n = self.num_hidden_layers
        if self.layer_num_key_value_heads is None:
            self.layer_num_key_value_heads = [self.num_key_value_heads or self.num_attention_heads] * n
        if self.layer_intermediate_sizes is None:
            self.layer_intermediate_sizes = [self.intermediate_size] * n
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        n = self.num_hidden_layers
        if len(self.layer_num_key_value_heads) != n or len(self.layer_intermediate_sizes) != n:
            raise ValueError(
                f"layer_num_key_value_heads and layer_intermediate_sizes need {n} entries (num_hidden_layers)"
            )
        if any(not 0 <= k <= self.num_key_value_heads for k in self.layer_num_key_value_heads):
            raise ValueError(f"layer_num_key_value_heads must lie in [0, {self.num_key_value_heads}]")
        if any(f < 0 for f in self.layer_intermediate_sizes):
            raise ValueError("layer_intermediate_sizes must be >= 0")

    @property
    def layer_num_attention_heads(self) -> list[int]:
        group = self.num_attention_heads // self.num_key_value_heads
        return [k * group for k in self.layer_num_key_value_heads]


__all__ = ["DMSLlamaConfig"]
