"""Export a searched structure as a smaller checkpoint (DESIGN.md §4).

A uniform structure becomes a stock model of the source's class (plain ``from_pretrained``); a per-layer one a
``DMSLlamaForCausalLM`` whose config and modeling files are saved beside the weights (``trust_remote_code=True``).
Every export is written to a temporary folder beside the target, reloaded from disk and compared with the
hard-masked source model, and only then moved into place.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .gates import hard_masked
from .resources import ResourceModel
from .structure import ModelShape, Structure, decoder_layers

logger = logging.getLogger("dms_llm")

DROP_CONFIG_KEYS = ("quantization_config", "auto_map", "architectures", "_name_or_path", "transformers_version",
                    "model_type", "layer_num_key_value_heads", "layer_intermediate_sizes", "dtype", "torch_dtype")


class ExportError(RuntimeError):
    """The export could not be written or did not reproduce the masked model."""


@dataclass
class ExportResult:
    path: Path
    model: nn.Module  # the pruned model, in memory
    uniform: bool
    max_abs_diff: float
    params: int


def _slice_layer(state: dict, layer_structure, shape: ModelShape) -> dict:
    """Slice one decoder layer's state dict to the kept KV groups and MLP channels (removed blocks dropped)."""
    d, r = shape.head_dim, shape.heads_per_group
    kv = torch.tensor(layer_structure.kv_heads, dtype=torch.long)
    q_heads = (kv[:, None] * r + torch.arange(r)[None]).flatten()
    q_rows = (q_heads[:, None] * d + torch.arange(d)[None]).flatten()
    kv_rows = (kv[:, None] * d + torch.arange(d)[None]).flatten()
    ch = torch.tensor(layer_structure.channels, dtype=torch.long)
    out = {}
    for key, value in state.items():
        if key.startswith(("self_attn.", "input_layernorm.")) and not layer_structure.kv_heads:
            continue
        if key.startswith(("mlp.", "post_attention_layernorm.")) and not layer_structure.channels:
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


def pruned_config(model: nn.Module, structure: Structure):
    """The config of the pruned model: the source's config class when the structure is uniform, else
    ``DMSLlamaConfig`` with per-layer widths."""
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
            raise ExportError(f"the uniform structure gives a config that {type(model.config).__name__} rejects: {e}") from None
    if shape.model_type != "llama":
        raise ExportError(
            f"per-layer export supports Llama models; for model_type={shape.model_type!r} search with --uniform"
        )
    from .modeling.configuration_dms_llama import DMSLlamaConfig

    base.update(
        layer_num_key_value_heads=[len(structure.layers[i].kv_heads) for i in kept],
        layer_intermediate_sizes=[len(structure.layers[i].channels) for i in kept],
    )
    return DMSLlamaConfig(**base)


def build_pruned_model(model: nn.Module, structure: Structure) -> nn.Module:
    """A new, smaller model holding sliced copies of ``model``'s weights; ``model`` is not changed."""
    shape = ModelShape.from_model(model)
    structure.validate(shape)
    config = pruned_config(model, structure)
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
    return new


def probe_ids(vocab_size: int, device) -> torch.Tensor:
    """Fixed random token ids on which a written checkpoint is compared with the model in memory."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, 48), generator=g).to(device)


def check_output_dir(out_dir: str | Path, source_dir: str | Path | None, overwrite: bool) -> Path:
    """Refuse outputs that would overwrite the source or existing work; return the resolved target."""
    out = Path(out_dir).expanduser().resolve()
    if source_dir is not None:
        src = Path(source_dir).resolve()
        if out == src or src in out.parents:
            raise ExportError(f"refusing to write the export into the source folder {src}; choose --out elsewhere")
        if out in src.parents:
            raise ExportError(f"refusing to write the export to {out}, which contains the source model {src}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {parent} (read-only or no permission); choose a writable --out")
    return out


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
) -> ExportResult:
    """Slice ``model`` to ``structure``, save it to ``out_dir`` with tokenizer, generation config,
    ``dms_structure.json`` and ``dms_structure.png``, reload it and check its logits against the hard-masked
    model (fp32: max abs diff <= 1e-3), then move it into place."""
    shape = ModelShape.from_model(model)
    structure.validate(shape)
    out = check_output_dir(out_dir, source_dir, overwrite)
    device = next(model.parameters()).device
    probe = probe_ids(shape.vocab_size, device)
    with torch.no_grad(), hard_masked(model, structure):
        reference = model(input_ids=probe, use_cache=False).logits.float()
    pruned = build_pruned_model(model, structure)
    uniform = structure.is_uniform()

    res_p, res_m = ResourceModel(shape, "params"), ResourceModel(shape, "macs", 2048)
    info = {
        "format": "uniform (stock config)" if uniform else "per-layer (trust_remote_code)",
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
        "params_after": res_p.of_structure(structure),
        "macs_2048_before": res_m.dense(),
        "macs_2048_after": res_m.of_structure(structure),
        **(metadata or {}),
    }
    diff = write_checkpoint(pruned, out, structure, info, probe, reference, tokenizer=tokenizer, atol=atol,
                            extra_files=extra_files)
    return ExportResult(out, pruned, uniform, diff, info["params_after"])


def write_checkpoint(
    model: nn.Module,
    out: Path,
    structure: Structure,
    info: dict,
    probe: torch.Tensor,
    reference: torch.Tensor,
    tokenizer=None,
    atol: float | None = None,
    extra_files: dict[str, str] | None = None,
) -> float:
    """Save ``model`` with tokenizer, ``dms_structure.json`` (``info`` + structure), the structure plot, a model
    card and ``extra_files`` into a temporary folder beside ``out``; reload it and check its logits on ``probe``
    against ``reference``; then move it into place. Returns the max abs logit difference."""
    dtype = next(model.parameters()).dtype
    atol = atol if atol is not None else (1e-3 if dtype == torch.float32 else 1e-1)
    uniform = structure.is_uniform()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        structure.save(tmp / "dms_structure.json", **info)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        from .card import write_model_card

        write_model_card(tmp, info)
        try:
            from .plot import plot_structure

            plot_structure(structure, info["dense_query_heads"], info["dense_mlp_channels"], tmp / "dms_structure.png",
                           title=f"{info['params_after'] / 1e6:.1f}M of {info['params_before'] / 1e6:.1f}M parameters")
        except ImportError:  # matplotlib is optional
            logger.warning("matplotlib is not installed: no dms_structure.png")
        diff = _verify(tmp, probe, reference, uniform, atol, dtype)
        _move_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(
            f"could not write the export beside {out} ({e.strerror or e}); free disk space or choose another --out. "
            f"Nothing was changed in {out}."
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s (%s), reloaded logits max abs diff %.2e", out, info["format"], diff)
    return diff


def _verify(folder: Path, probe: torch.Tensor, reference: torch.Tensor, uniform: bool, atol: float, dtype) -> float:
    """Reload the written folder in the source's dtype and compare its logits with the masked model's."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=not uniform, dtype=dtype)
    reloaded.to(probe.device).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe, use_cache=False).logits.float()
    diff = (logits - reference).abs().max().item()
    if not diff <= atol:
        raise ExportError(
            f"the reloaded export differs from the masked model: max abs logit diff {diff:.3e} > {atol:g}. "
            f"Nothing was written to the output folder; please report this with dms_structure.json."
        )
    return diff


def _move_into_place(tmp: Path, out: Path) -> None:
    """Atomic as far as the file system allows: the old folder is only removed once the new one is in place."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_atomic(path: Path, text: str) -> None:
    """Write a small file into a finished export without ever leaving it half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_structure_file(folder: str | Path) -> dict:
    """The contents of an export's ``dms_structure.json`` (structure, sizes, how it was made, results)."""
    path = Path(folder) / "dms_structure.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no dms_structure.json: it is not a dms-llm export")
    return json.loads(path.read_text())


def update_structure_file(folder: str | Path, **values) -> dict:
    """Add ``values`` to a finished export's ``dms_structure.json`` and re-render its model card, atomically."""
    from .card import write_model_card

    info = {**load_structure_file(folder), **values}
    write_atomic(Path(folder) / "dms_structure.json", json.dumps(info, indent=1))
    write_model_card(folder, info)
    return info
