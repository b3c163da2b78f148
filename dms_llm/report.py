"""How results read on a console: the tables ``dms-llm`` prints after a prune, a recovery and an evaluation."""

from __future__ import annotations

from pathlib import Path


def markdown_table(head, rows) -> str:
    """A Markdown table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(row) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _ppl_row(before: dict, after: dict) -> tuple:
    label = f"perplexity ({Path(before['data']).name}, {after['windows']}x{after['seq_len']} tokens)"
    return label, f"{before['ppl']:.3f}", f"{after['ppl']:.3f}", f"{after['ppl'] / before['ppl']:.3f}"


def blocks_kept(info: dict) -> float | None:
    """The kept fraction of the parameters outside the embeddings (the transformer blocks), from an export's
    record; None when the record predates ``embedding_params``."""
    emb = info.get("embedding_params")
    if emb is None or info["params_before"] <= emb:
        return None
    return (info["params_after"] - emb) / (info["params_before"] - emb)


def prune_report(run, model: str) -> str:
    """What :func:`dms_llm.pipeline.prune_checkpoint` did: structure, sizes, perplexity, times."""
    info, search = run.info, run.search
    dp, pp, dm, pm = info["params_before"], info["params_after"], info["macs_2048_before"], info["macs_2048_after"]
    rows = [("parameters", f"{dp:,}", f"{pp:,}", f"{pp / dp:.3f}")]
    blocks = blocks_kept(info)
    if blocks is not None:
        emb = info["embedding_params"]
        rows.append(("  without embeddings", f"{dp - emb:,}", f"{pp - emb:,}", f"{blocks:.3f}"))
    rows.append(("MACs per 2048 tokens", f"{dm / 1e9:.1f}G", f"{pm / 1e9:.1f}G", f"{pm / dm:.3f}"))
    if run.perplexity:
        rows.append(_ppl_row(run.perplexity["dense"], run.perplexity["pruned"]))
    cost = (info.get("search") or {}).get("step_cost")
    per_step = f"; a step = {cost['ratio']:.2f}x a plain forward+backward" if cost else ""
    precision = "" if search.precision == "no" else f", {search.precision}"
    steps = f"{search.steps_run} steps" + (f" + {search.uniform_steps_run} uniform" if search.uniform_steps_run else "")
    rows.append(("search time", "", f"{search.search_seconds:.1f} s ({steps}{precision}{per_step})", ""))
    if run.reconstruction:
        rows.append(("reconstruction time", "", f"{run.reconstruction['seconds']:.1f} s", ""))
    rows.append(("total time", "", f"{run.seconds:.1f} s", ""))
    kind = "uniform, stock config" if run.export.uniform else "per-layer, trust_remote_code"
    lines = [f"DMS prune of {model} -> {run.out}  ({kind})", search.structure.summary(),
             markdown_table(("", "dense", "pruned", "pruned/dense"), rows)]
    lines += candidates_report(info)
    if info.get("warning"):
        lines.append("WARNING: " + info["warning"])
    return "\n".join(lines + ([gguf_report(run.gguf)] if run.gguf else []))


def candidates_report(info: dict) -> list[str]:
    """The candidates the search's checks scored and why the kept one won (lines; none when there was one)."""
    search = info.get("search") or {}
    checked = search.get("depth_check") or []
    chosen = next((c for c in checked if c["chosen"]), None)
    if chosen is None:
        return []
    after = search.get("depth_check_after_repair")
    key, what = ("kl_repaired", f"KL to the dense model once repaired, on {after} held-out calibration windows") \
        if after else ("loss", "the search's loss on calibration windows")

    def name(c: dict) -> str:
        removed = sum(c["removed"].values())
        return f"{c.get('format', 'per-layer')}, {removed} block{'s' * (removed != 1)} removed"

    scored = [c for c in checked if c.get(key) is not None]
    return [f"candidates ({what}): " + "; ".join(f"{name(c)} {c[key]:.4f}" + (" <- kept" if c["chosen"] else "")
                                                  for c in scored),
            f"kept {name(chosen)}: {chosen.get('reason', 'the lowest score')}"]


def finetune_report(run, model: str) -> str:
    """What :func:`dms_llm.pipeline.finetune_checkpoint` did."""
    r = run.result
    lines = [f"recovery of {model} -> {run.out}: {r.steps_run} steps, {r.tokens_seen:,} tokens, {r.seconds:.1f} s "
             f"({'LoRA, merged' if r.config.get('lora') else 'all weights'}; teacher {run.teacher or 'none'})"]
    if run.perplexity:
        lines.append(markdown_table(("", "before", "after", "after/before"),
                                    [_ppl_row(run.perplexity["pruned"], run.perplexity["recovered"]),
                                     ("total time", "", f"{run.seconds:.1f} s", "")]))
    return "\n".join(lines + ([gguf_report(run.gguf)] if run.gguf else []))


def evaluation_report(results: dict) -> str:
    """Perplexity lines, the zero-shot table and the speed line of :func:`dms_llm.evaluate`'s results."""
    lines = []
    for data, r in results.get("perplexity", {}).items():
        lines.append(f"perplexity {r['ppl']:.3f} on {data}: {r['windows']} of {r['total_windows']} windows of "
                     f"{r['seq_len']} tokens ({r['tokens']} predicted tokens, {r['seconds']:.1f} s)")
    if results.get("zero_shot"):
        rows = [(t, r["metric"], f"{100 * r['value']:.2f}",
                 f"{100 * r['stderr']:.2f}" if r["stderr"] is not None else
                 (f"95% [{100 * r['low']:.2f}, {100 * r['high']:.2f}]" if "low" in r else "n/a"), str(r["n"]))
                for t, r in results["zero_shot"].items()]
        lines.append(markdown_table(("task", "metric", "value (%)", "stderr (%)", "n"), rows))
    if results.get("speed"):
        sp = results["speed"]
        lines.append(f"speed on {sp['device']}: prefill {sp['prefill_tokens_per_s']:.0f} tok/s (batch "
                     f"{sp['batch_size']} x {sp['prompt_len']}), decode {sp['decode_tokens_per_s']:.1f} tok/s "
                     f"({sp['new_tokens']} tokens), weights {sp['weight_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)


def gguf_report(result) -> str:
    """What :func:`dms_llm.gguf_export.write_gguf` wrote and what llama.cpp's check of it measured."""
    c = result.check
    lines = [f"wrote {result.path} ({result.architecture}, {result.type}, {result.bytes / 2**20:.1f} MiB; tokenizer "
             f"{result.tokenizer})",
             f"llama.cpp check on {c['tokens']} tokens: tokenization {c['tokenization']}, max abs logit diff "
             f"{c['max_abs_logit_diff']:.3g}, perplexity {c['ppl_llama_cpp']:.3f} vs {c['ppl_hf']:.3f} in "
             f"transformers, same argmax {100 * c['same_argmax']:.1f}% (bound: {c['bound']})"]
    if result.fallbacks:
        lines.append(f"not quantized to {result.type} (rows not a multiple of 32): "
                     + ", ".join(f"{f['tensor']} ({f['type']})" for f in result.fallbacks))
    return "\n".join(lines)


__all__ = ["evaluation_report", "finetune_report", "gguf_report", "markdown_table", "prune_report"]
