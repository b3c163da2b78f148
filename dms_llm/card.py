"""A model card (README.md with Hub metadata) for an export, rendered with huggingface_hub."""

from __future__ import annotations

from pathlib import Path

HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def render_model_card(info: dict, perplexity: dict | None = None) -> str:
    """Card text from the contents of ``dms_structure.json`` (+ optional dense/pruned perplexity)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = info.get("base_model")
    base = HUB_IDS.get(base, base)
    hub_base = base if base and "/" in base and not Path(base).exists() else None
    per_layer = info.get("format", "").startswith("per-layer")
    data = ModelCardData(base_model=hub_base, library_name="transformers", pipeline_tag="text-generation",
                         tags=["pruned", "dms", "dms-llm", "structured-pruning"])
    before, after = info.get("params_before", 0), info.get("params_after", 0)
    load = "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" if per_layer else \
        "AutoModelForCausalLM.from_pretrained(path)"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {base or 'model'} pruned with DMS", "",
        f"A structurally pruned version of `{base}` made with dms-llm (Differentiable Model Scaling): "
        f"{after:,} of {before:,} parameters ({after / max(before, 1):.1%}), "
        f"{info.get('num_layers_after')} of {info.get('num_layers_before')} layers. "
        f"Format: {info.get('format')}.", "",
        "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = {load}", "tokenizer = AutoTokenizer.from_pretrained(path)", "```", "",
        "## Structure", "",
        f"Query heads kept per layer: {info.get('kept_query_heads')}", "",
        f"MLP channels kept per layer: {info.get('kept_mlp_channels')}", "",
        "![kept structure per layer](dms_structure.png)", "",
    ]
    if perplexity:
        lines += ["## Perplexity", "", "| model | perplexity | data |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['ppl']:.3f} | {v['data']}, {v['windows']} x {v['seq_len']} tokens |"
                  for k, v in perplexity.items() if v]
        lines.append("")
    if info.get("command"):
        lines += ["## How it was made", "", "```bash", info["command"], "```", ""]
    lines += ["No weights were updated: the structure was searched with frozen weights and the kept weights "
              "were sliced from the original model.", ""]
    return str(ModelCard("\n".join(lines)))


def write_model_card(folder: str | Path, info: dict, perplexity: dict | None = None) -> Path:
    """Write ``README.md`` atomically into ``folder``."""
    from .exporter import write_atomic

    path = Path(folder) / "README.md"
    write_atomic(path, render_model_card(info, perplexity))
    return path
