"""What a Llama-family model looks like, and the hard structure a search chose for it.

``ModelShape`` reads the widths DMS can prune from a model and refuses architectures it cannot handle.
``Structure`` is the hard choice per layer (kept KV groups, kept MLP channels, kept blocks) that export slices by
and that is saved as ``dms_structure.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .errors import DMSError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "dms_llama")
SANDWICH_NORM_TYPES = ("gemma3_text",)  # a norm after each block's output too (post_attention / post_feedforward)
QK_NORM_TYPES = ("qwen3", "gemma3_text")  # an RMSNorm over each query and key head
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


class UnsupportedModelError(DMSError, ValueError):
    """The model is not a decoder-only Llama-family model that DMS can prune."""


@dataclass(frozen=True)
class ModelShape:
    """The prunable widths of a Llama-family decoder (uniform across layers, as in the source checkpoint)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"

    @property
    def sandwich_norms(self) -> bool:
        """Each block's output passes a norm before it joins the stream (Gemma 3), so a block's gate sits after it."""
        return self.model_type in SANDWICH_NORM_TYPES

    @property
    def qk_norm(self) -> bool:
        return self.model_type in QK_NORM_TYPES

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelShape":
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", type(model).__name__)
        arch = ", ".join(getattr(config, "architectures", None) or [type(model).__name__])
        supported = (
            "decoder-only Llama-family models whose layers have self_attn.{q,k,v,o}_proj and "
            "mlp.{gate,up,down}_proj (Llama 1/2/3, SmolLM, Mistral, Qwen2, Qwen3, Gemma 3 text models)"
        )
        if model_type == "dms_llama":
            raise UnsupportedModelError(
                "this checkpoint was already pruned per layer by dms-llm; prune the original model instead."
            )
        layers = decoder_layers(model)
        if layers is None or model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"dms-llm cannot prune model_type={model_type!r} ({arch}). Supported: {supported}."
            )
        for i, layer in enumerate(layers):
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if attn is None or mlp is None or not all(hasattr(attn, p) for p in ATTN_PROJS) or not all(
                hasattr(mlp, p) for p in MLP_PROJS
            ):
                raise UnsupportedModelError(
                    f"layer {i} of {arch} lacks self_attn.{{q,k,v,o}}_proj or mlp.{{gate,up,down}}_proj. "
                    f"Supported: {supported}."
                )
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if n_heads % n_kv != 0:
            raise UnsupportedModelError(f"num_attention_heads={n_heads} is not a multiple of "
                                        f"num_key_value_heads={n_kv}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=len(layers),
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)) or model_type == "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            model_type=model_type,
        )

    def valid_uniform_group_counts(self) -> list[int]:
        """KV-group counts a stock config accepts (LlamaConfig needs hidden_size % num_attention_heads == 0)."""
        return [g for g in range(1, self.num_kv_heads + 1) if self.hidden_size % (g * self.heads_per_group) == 0]

    def tensor_parallel_group_counts(self, tp: int) -> list[int]:
        """KV-group counts (one or more) whose attention tensor parallelism of size ``tp`` splits."""
        return [g for g in range(1, self.num_kv_heads + 1) if splits_across(tp, g, self.heads_per_group, 0)]


def splits_across(tp: int, kv_heads: int, heads_per_group: int, width: int) -> bool:
    """Whether tensor parallelism of size ``tp`` splits a layer with ``kv_heads`` KV heads (0: no attention),
    ``heads_per_group`` query heads per KV head and an MLP ``width`` (0: no MLP), as vLLM shards it: the query heads
    and the MLP width divide by ``tp``, and the KV heads divide by it or it by them (fewer KV heads than GPUs are
    replicated)."""
    heads = kv_heads == 0 or (kv_heads * heads_per_group % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0))
    return heads and width % tp == 0


def layer_windows(config) -> list[int | None]:
    """The attention window of every layer of a source config (None = full attention): Qwen2/3 say it per layer in
    ``layer_types``, Mistral has one ``sliding_window`` for all."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list):
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * config.num_hidden_layers


def decoder_layers(model: nn.Module):
    """The ``nn.ModuleList`` of decoder layers of a causal LM, or None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


@dataclass
class LayerStructure:
    kv_heads: list[int] = field(default_factory=list)  # kept KV groups (KV head indices); [] = attention removed
    channels: list[int] = field(default_factory=list)  # kept MLP channels; [] = MLP removed


@dataclass
class Structure:
    """The hard structure to export: per layer, kept KV groups and kept MLP channels (empty = block removed)."""

    heads_per_group: int
    head_dim: int
    layers: list[LayerStructure]

    @classmethod
    def dense(cls, shape: ModelShape) -> "Structure":
        return cls(
            shape.heads_per_group,
            shape.head_dim,
            [
                LayerStructure(list(range(shape.num_kv_heads)), list(range(shape.intermediate_size)))
                for _ in range(shape.num_layers)
            ],
        )

    # -- per-layer summaries -------------------------------------------------------------------------------
    def num_kv_heads(self) -> list[int]:
        return [len(layer.kv_heads) for layer in self.layers]

    def num_heads(self) -> list[int]:
        return [len(layer.kv_heads) * self.heads_per_group for layer in self.layers]

    def intermediate_sizes(self) -> list[int]:
        return [len(layer.channels) for layer in self.layers]

    def kept_layers(self) -> list[int]:
        """Indices of layers that keep at least one block (a layer with neither is dropped on export)."""
        return [i for i, layer in enumerate(self.layers) if layer.kv_heads or layer.channels]

    def is_uniform(self) -> bool:
        """True when a stock config can describe it: all kept layers have both blocks and equal widths."""
        kept = [self.layers[i] for i in self.kept_layers()]
        if not kept:
            return False
        heads = {len(layer.kv_heads) for layer in kept}
        channels = {len(layer.channels) for layer in kept}
        return len(heads) == 1 and len(channels) == 1 and 0 not in heads and 0 not in channels

    def counts(self) -> dict[str, int]:
        """Totals over the model: kept layers, attention and MLP blocks, query heads, MLP channels."""
        return {
            "layers": len(self.kept_layers()),
            "attn_blocks": sum(1 for layer in self.layers if layer.kv_heads),
            "mlp_blocks": sum(1 for layer in self.layers if layer.channels),
            "heads": sum(self.num_heads()),
            "channels": sum(self.intermediate_sizes()),
        }

    def summary(self) -> str:
        c = self.counts()
        return (
            f"layers {c['layers']}/{len(self.layers)}, attention blocks {c['attn_blocks']}, MLP blocks "
            f"{c['mlp_blocks']}, query heads {c['heads']}, MLP channels {c['channels']}"
        )

    # -- (de)serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Structure":
        return cls(
            heads_per_group=int(data["heads_per_group"]),
            head_dim=int(data["head_dim"]),
            layers=[LayerStructure(list(map(int, x["kv_heads"])), list(map(int, x["channels"])))
                    for x in data["layers"]],
        )

    def validate(self, shape: ModelShape) -> None:
        """Raise ValueError when the structure does not fit the model (wrong layer count, bad indices)."""
        if len(self.layers) != shape.num_layers:
            raise ValueError(f"structure has {len(self.layers)} layers, the model has {shape.num_layers}")
        if self.heads_per_group != shape.heads_per_group or self.head_dim != shape.head_dim:
            raise ValueError("structure was made for a model with another attention layout")
        for i, layer in enumerate(self.layers):
            for what, kept, n in (("KV head", layer.kv_heads, shape.num_kv_heads),
                                  ("MLP channel", layer.channels, shape.intermediate_size)):
                if any(not 0 <= x < n for x in kept) or len(set(kept)) != len(kept):
                    raise ValueError(f"layer {i}: {what} indices must be distinct and in [0, {n})")
        if not self.kept_layers():
            raise ValueError("structure removes every layer")
