"""Export a searched structure as a smaller checkpoint (docs/DESIGN.md §4).

A uniform structure becomes a stock model of the source's class (plain ``from_pretrained``); a per-layer one a
``DMSLlamaForCausalLM`` whose config and modeling files are saved beside the weights (``trust_remote_code=True``).
The sliced model is compared with the hard-masked source in memory; the folder is then written, reloaded and
checked by :mod:`dms_llm.folder`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .folder import ExportError, check_output_dir, check_same_logits, probe_logits, slicing_atol, write_checkpoint
from .gates import hard_masked
from .resources import ResourceModel, count_parameters
from .structure import ModelShape, Structure, decoder_layers, layer_windows

DROP_CONFIG_KEYS = ("quantization_config", "auto_map", "architectures", "_name_or_path", "transformers_version",
                    "model_type", "layer_num_key_value_heads", "layer_intermediate_sizes", "dtype", "torch_dtype")
# what each block owns in a layer's state dict (index: the model has sandwich norms, Gemma 3)
ATTENTION_KEYS = {False: ("self_attn.", "input_layernorm."),
                  True: ("self_attn.", "input_layernorm.", "post_attention_layernorm.")}
MLP_KEYS = {False: ("mlp.", "post_attention_layernorm."),
            True: ("mlp.", "pre_feedforward_layernorm.", "post_feedforward_layernorm.")}
PER_LAYER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")  # what the per-layer format describes
# source config keys the per-layer config says otherwise (layer_types, sliding_window, hidden_act) or not at all
FAMILY_ONLY_KEYS = ("use_sliding_window", "max_window_layers", "layer_types", "sliding_window", "hidden_activation",
                    "sliding_window_pattern", "rope_local_base_freq", "attn_logit_softcapping",
                    "use_bidirectional_attention", "_sliding_window_pattern")


@dataclass
class ExportResult:
    path: Path
    model: nn.Module  # the pruned model, in memory
    uniform: bool
    max_abs_diff: float
    params: int


def kept_rows(layer_structure, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The indices one layer keeps: rows of q_proj (= columns of o_proj), rows of k_proj / v_proj, MLP channels."""
    d, r = shape.head_dim, shape.heads_per_group
    kv = torch.tensor(layer_structure.kv_heads, dtype=torch.long)
    q_heads = (kv[:, None] * r + torch.arange(r)[None]).flatten()
    q_rows = (q_heads[:, None] * d + torch.arange(d)[None]).flatten()
    kv_rows = (kv[:, None] * d + torch.arange(d)[None]).flatten()
    return q_rows, kv_rows, torch.tensor(layer_structure.channels, dtype=torch.long)


def _slice_layer(state: dict, layer_structure, shape: ModelShape) -> dict:
    """Slice one decoder layer's state dict to the kept KV groups and MLP channels (removed blocks dropped)."""
    q_rows, kv_rows, ch = kept_rows(layer_structure, shape)
    out = {}
    for key, value in state.items():
        if key.startswith(ATTENTION_KEYS[shape.sandwich_norms]) and not layer_structure.kv_heads:
            continue
        if key.startswith(MLP_KEYS[shape.sandwich_norms]) and not layer_structure.channels:
            continue
        if key.startswith("self_attn.q_proj."):
            value = value.index_select(0, q_rows)
        elif key.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            value = value.index_select(0, kv_rows)
        elif key == "self_attn.o_proj.weight":
            value = value.index_select(1, q_rows)
        elif key.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            value = value.index_select(0, ch)
        elif key == "mlp.down_proj.weight":
            value = value.index_select(1, ch)
        out[key] = value.clone()
    return out


def pruned_config(model: nn.Module, structure: Structure, output_bias: bool = False):
    """The config of the pruned model: the source's config class when the structure is uniform, else
    ``DMSLlamaConfig`` with per-layer widths (and, with ``output_bias``, a bias on every kept ``o_proj`` and
    ``down_proj``; stock configs have no such option, so a uniform structure never gets one)."""
    shape = ModelShape.from_model(model)
    kept = structure.kept_layers()
    base = {k: v for k, v in model.config.to_dict().items() if k not in DROP_CONFIG_KEYS}
    base.update(num_hidden_layers=len(kept), head_dim=shape.head_dim)
    if isinstance(base.get("layer_types"), list):
        base["layer_types"] = [base["layer_types"][i] for i in kept]
    if structure.is_uniform():
        layer = structure.layers[kept[0]]
        base.update(
            num_attention_heads=len(layer.kv_heads) * shape.heads_per_group,
            num_key_value_heads=len(layer.kv_heads),
            intermediate_size=len(layer.channels),
        )
        try:
            return type(model.config)(**base)
        except Exception as e:
            raise ExportError(f"the uniform structure gives a config that {type(model.config).__name__} "
                              f"rejects: {e}") from None
    if shape.model_type not in PER_LAYER_FAMILIES:
        raise ExportError(
            f"per-layer export supports {', '.join(PER_LAYER_FAMILIES)} models; for model_type={shape.model_type!r} "
            f"search with --uniform"
        )
    from .modeling.configuration_dms_llama import DMSLlamaConfig

    source = model.config
    source_windows = layer_windows(source)
    windows = [source_windows[i] for i in kept]
    window = next((w for w in source_windows if w), None)  # one window per family, on its sliding layers
    gemma = shape.model_type == "gemma3_text"
    for key in FAMILY_ONLY_KEYS:
        base.pop(key, None)
    layer_types = ["sliding_attention" if w else "full_attention" for w in windows]
    rope = base.get("rope_parameters")
    if isinstance(rope, dict) and all(isinstance(rope.get(t), dict) for t in set(layer_types)):
        base["rope_parameters"] = {t: rope[t] for t in sorted(set(layer_types))}  # one per kept layer type (Gemma)
    base.update(
        layer_num_key_value_heads=[len(structure.layers[i].kv_heads) for i in kept],
        layer_intermediate_sizes=[len(structure.layers[i].channels) for i in kept],
        output_bias=output_bias,
        source_model_type=shape.model_type,
        qkv_bias=shape.model_type == "qwen2",
        qk_norm=shape.qk_norm,
        layer_types=layer_types,
        sliding_window=window,
        sandwich_norms=shape.sandwich_norms,
        norm_unit_offset=gemma,
        embed_scale=float(source.hidden_size**0.5) if gemma else None,
        query_pre_attn_scalar=getattr(source, "query_pre_attn_scalar", None) if gemma else None,
        final_logit_softcapping=getattr(source, "final_logit_softcapping", None),
        hidden_act=getattr(source, "hidden_activation", None) or source.hidden_act,
    )
    return DMSLlamaConfig(**base)


def check_per_layer_support(model: nn.Module) -> None:
    """ExportError, before any search, when a per-layer export of ``model`` could not be written."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in PER_LAYER_FAMILIES:
        raise ExportError(f"per-layer export supports {', '.join(PER_LAYER_FAMILIES)} models, not "
                          f"{model_type!r}; use --format uniform (a stock checkpoint of the source's class)")
    if getattr(model.config, "use_bidirectional_attention", False):
        raise ExportError("this Gemma 3 model attends in both directions (an embedding model); dms-llm's per-layer "
                          "format is causal. Use --format uniform (a stock Gemma3TextModel config)")


def build_pruned_model(model: nn.Module, structure: Structure, atol: float | None = None,
                       output_bias: bool = False) -> nn.Module:
    """A new, smaller model holding sliced copies of ``model``'s weights; ``model`` is not changed. Its logits are
    checked against ``model`` hard-masked to ``structure`` (max abs diff <= ``atol``, by default 1e-2 in fp32).
    ``output_bias`` (per-layer structures only) adds zero output biases for the reconstruction to fit."""
    shape = ModelShape.from_model(model)
    structure.validate(shape)
    output_bias = output_bias and not structure.is_uniform()
    config = pruned_config(model, structure, output_bias)
    if structure.is_uniform():
        model_cls = type(model)
    else:
        from .modeling.modeling_dms_llama import DMSLlamaForCausalLM as model_cls
    state: dict[str, torch.Tensor] = {}
    layers = decoder_layers(model)
    for new_idx, old_idx in enumerate(structure.kept_layers()):
        sliced = _slice_layer(layers[old_idx].state_dict(), structure.layers[old_idx], shape)
        state.update({f"model.layers.{new_idx}.{k}": v for k, v in sliced.items()})
    for key, value in model.state_dict().items():
        if not key.startswith("model.layers."):
            state[key] = value.clone()
    if output_bias:  # zero biases: the sliced model still computes what the masked one does
        for new_idx, old_idx in enumerate(structure.kept_layers()):
            layer = structure.layers[old_idx]
            for kept, name in ((layer.kv_heads, "self_attn.o_proj"), (layer.channels, "mlp.down_proj")):
                if kept:
                    state.setdefault(f"model.layers.{new_idx}.{name}.bias", torch.zeros(shape.hidden_size))
    with torch.device("meta"):
        new = model_cls(config)
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ExportError(f"sliced weights do not fit the pruned model: missing {missing}, unexpected {unexpected}")
    # non-persistent buffers (rotary frequencies) are not in the state dict: take them from the source
    source_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            module_name, _, attr = name.rpartition(".")
            new.get_submodule(module_name)._buffers[attr] = source_buffers[name].clone()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.to(next(model.parameters()).device)
    new.eval()
    with hard_masked(model, structure):
        expected = probe_logits(model)
    check_same_logits(expected, probe_logits(new), slicing_atol(model) if atol is None else atol, "the sliced model")
    return new


def structure_info(model: nn.Module, structure: Structure, pruned: nn.Module) -> dict:
    """What ``dms_structure.json`` records about the structure: format, widths per layer, sizes before and after."""
    shape = ModelShape.from_model(model)
    res_p, res_m = ResourceModel(shape, "params"), ResourceModel(shape, "macs", 2048)
    return {
        "format": "uniform (stock config)" if structure.is_uniform() else "per-layer (trust_remote_code)",
        "source_architecture": type(model).__name__,
        "num_layers_before": shape.num_layers,
        "num_layers_after": len(structure.kept_layers()),
        "dense_query_heads": shape.num_heads,
        "dense_mlp_channels": shape.intermediate_size,
        "kept_query_heads": structure.num_heads(),
        "kept_kv_heads": structure.num_kv_heads(),
        "kept_mlp_channels": structure.intermediate_sizes(),
        "attention_blocks_kept": [bool(x.kv_heads) for x in structure.layers],
        "mlp_blocks_kept": [bool(x.channels) for x in structure.layers],
        "params_before": res_p.dense(),
        "params_after": count_parameters(pruned),
        "embedding_params": res_p.embedding_params(),
        "macs_2048_before": res_m.dense(),
        "macs_2048_after": res_m.of_structure(structure),
    }


def export(
    model: nn.Module,
    structure: Structure,
    out_dir: str | Path,
    tokenizer=None,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
    metadata: dict | None = None,
    atol: float | None = None,
    extra_files: dict[str, str] | None = None,
    pruned: nn.Module | None = None,
) -> ExportResult:
    """Slice ``model`` to ``structure`` (or take ``pruned``, a model already sliced to it and perhaps repaired),
    save it to ``out_dir`` with tokenizer, generation config, ``dms_structure.json``, ``dms_structure.png`` and a
    model card, reload it and check its logits against the model in memory (fp32: max abs diff <= 1e-3), then move
    it into place. ``source_dir`` (the input checkpoint's folder, or its .gguf file) is never written to."""
    shape = ModelShape.from_model(model)
    structure.validate(shape)
    out = check_output_dir(out_dir, source_dir, overwrite)
    if pruned is None:
        pruned = build_pruned_model(model, structure, atol=atol)
    info = {**structure_info(model, structure, pruned), **(metadata or {})}
    diff = write_checkpoint(pruned, out, structure, info, tokenizer=tokenizer, atol=atol, extra_files=extra_files)
    return ExportResult(out, pruned, structure.is_uniform(), diff, info["params_after"])
