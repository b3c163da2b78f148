"""Does removing whole layers / blocks pay? The depth check of the DMS search (docs/DESIGN.md §3), measured.

    python scripts/benchmark_depth.py                               # SmolLM2-135M, WikiText-2 from the Hub
    python scripts/benchmark_depth.py --calib DIR/wiki.valid.tokens --eval-data DIR/wiki.test.raw

For each mode (per-layer, uniform) and budget: one DMS search (the peer table's calibration and settings), then
every structure its depth check scored — the searched depth, then 3/4, 1/2, 1/4 and none of its removals at the same
budget — each repaired by dms-llm's reconstruction and scored by perplexity on the first --windows windows of 2048
tokens of --eval-data (the peer table's protocol). Beside them: a search that may not remove any block
(``search_depth=False``) at --width-only-keeps, and Minitron-style width + reconstruction (the best uniform peer of
the peer table). Shows whether the check's pre-repair calibration loss picks what the repaired perplexity prefers.
Rows are appended to benchmarks/depth<tag>.json as they finish: an interrupted run resumes where it stopped.
"""

import argparse
import datetime
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
from bench_common import (  # a sibling module
    Methods,
    add_protocol_args,
    eval_windows,
    machine_name,
    protocol_windows,
    replace_section,
)

import dms_llm
from dms_llm.data import evaluation_tokens
from dms_llm.reconstruct import ReconstructConfig, held_out_scores, reconstruct
from dms_llm.resources import ResourceModel
from dms_llm.structure import ModelShape
from dms_llm.training import reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.8])
parser.add_argument("--modes", nargs="+", default=["uniform", "per_layer"], choices=["uniform", "per_layer"])
parser.add_argument("--width-only-keeps", type=float, nargs="*", default=[0.5],
                    help="budgets at which a search that may not remove blocks is run too")
add_protocol_args(parser)
parser.add_argument("--recon-samples", type=int, default=32)
parser.add_argument("--tag", default="", help="a name for this run's outputs (depth<tag>.json, its BENCHMARKS section)")
parser.add_argument("--cache-dir", default=str(ROOT / ".bench-cache"))
parser.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
args = parser.parse_args()
START, END = f"<!-- depth{args.tag}:start -->", f"<!-- depth{args.tag}:end -->"
logging.basicConfig(level=logging.WARNING)
reuse_freed_memory()

device = "cuda" if torch.cuda.is_available() else "cpu"
windows = eval_windows(args.windows, device)
model, tokenizer, _ = dms_llm.load_model(args.model, device=device)
tokens = evaluation_tokens(tokenizer, args.eval_data)
calib, held_out = protocol_windows(tokenizer, args.calib, args.seq_len, args.num_samples, args.repair_check)
settings = {"model": args.model, "calib": Path(args.calib).name, "num_samples": args.num_samples,
            "repair_check": args.repair_check, "repair_check_len": 2048,
            "seq_len": args.seq_len, "steps": args.steps, "recon_samples": args.recon_samples, "windows": windows}
out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
record_path = out / f"depth{args.tag}.json"
saved = json.loads(record_path.read_text()) if record_path.exists() else {}
same = saved.get("settings") == settings
rows = saved.get("rows", []) if same else []
variants = saved.get("variants", {}) if same else {}  # the candidates each search's depth check scored, by name
resources = ResourceModel(ModelShape.from_model(model))
# shared with the other benchmarks
methods = Methods(model, calib, args.calib, args.steps, cache_dir=args.cache_dir, held_out=held_out)


def save() -> None:
    record = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine_name(device), "settings": settings, "variants": variants, "rows": rows}
    record_path.write_text(json.dumps(record, indent=1))


def done(mode: str, keep: float, variant: str) -> bool:
    return any(r["mode"] == mode and r["keep"] == keep and r["variant"] == variant for r in rows)


def repaired_perplexity(structure) -> tuple[float, float, float | None]:
    """(perplexity after the repair, repair seconds, KL to the dense model on the held-out calibration windows after
    the repair — what the depth check after the repair compares)."""
    pruned = dms_llm.build_pruned_model(model, structure)
    t0 = time.perf_counter()
    reconstruct(pruned, model, structure, calib, ReconstructConfig(samples=args.recon_samples), progress=False)
    seconds = time.perf_counter() - t0
    scores = held_out_scores(pruned, model, held_out, batch_size=1) if held_out is not None else None
    return dms_llm.perplexity(pruned, tokens=tokens, max_windows=windows, progress=False)["ppl"], seconds, scores


def add(mode, keep, variant, structure, search_seconds, **extra) -> None:
    ppl, recon_seconds, scores = repaired_perplexity(structure)
    kl = scores["kl"] if scores else None
    row = {"mode": mode, "keep": keep, "variant": variant, "params": resources.of_structure(structure),
           "attn_blocks": sum(bool(x.kv_heads) for x in structure.layers),
           "mlp_blocks": sum(bool(x.channels) for x in structure.layers), "ppl_recon": ppl,
           "search_seconds": round(search_seconds, 1), "recon_seconds": round(recon_seconds, 1),
           "kl_repaired": kl, "lm_repaired": scores["lm"] if scores else None,
           "structure": structure.to_dict(), **extra}
    rows.append(row)
    save()
    print(f"{mode:9s} keep {keep} {variant:28s} blocks {row['attn_blocks']}/{row['mlp_blocks']}  "
          f"ppl+recon {ppl:9.2f}  check loss {extra.get('check_loss', float('nan')):.4f}  held-out KL after "
          f"repair {kl if kl is not None else float('nan'):.4f}, LM {scores['lm'] if scores else float('nan'):.4f}",
          flush=True)


def variant_name(removed: dict, searched: bool) -> str:
    n = sum(removed.values())
    return ("searched depth: " if searched else "fewer removals: ") + f"{n} removed"


for keep in args.keeps:
    for mode in args.modes:
        uniform = mode == "uniform"
        config = dms_llm.PruneConfig(keep=keep, steps=args.steps, uniform=uniform)
        if not all(done(mode, keep, v) for v in variants.get(f"{mode}-{keep}", ["?"])):
            t0 = time.perf_counter()
            result = dms_llm.prune(model, calib, config, progress=False)
            seconds = time.perf_counter() - t0
            checked = result.depth_check or [{"removed": {}, "loss": float("nan"), "chosen": True}]
            structures = result.candidates or [result.structure]
            names = [variant_name(c["removed"], i == 0) for i, c in enumerate(checked)]
            variants[f"{mode}-{keep}"] = names
            for name, c, structure in zip(names, checked, structures):
                if not done(mode, keep, name):
                    add(mode, keep, name, structure, seconds, check_loss=c["loss"], chosen=c["chosen"],
                        removed=c["removed"])
            # the choice after the repair (what `dms-llm prune` keeps): the lowest held-out KL of the rows above
            scored = [r for r in rows if r["mode"] == mode and r["keep"] == keep and r["variant"] in names]
            if held_out is not None and len(scored) > 1:
                best = min(scored, key=lambda r: (r["kl_repaired"], names.index(r["variant"])))
                for r in scored:
                    r["chosen_after_repair"] = r is best
                save()
                structure = structures[names.index(best["variant"])]
            else:
                structure = result.structure
            # the same search as the peer table's DMS rows: the zero-shot and peer benchmarks reuse what it found
            methods.remember(f"dms_{mode}", keep, structure, seconds)
        if keep in args.width_only_keeps and not done(mode, keep, "width-only search"):
            t0 = time.perf_counter()
            result = dms_llm.prune(model, calib, dms_llm.PruneConfig(keep=keep, steps=args.steps, uniform=uniform,
                                                                     search_depth=False), progress=False)
            add(mode, keep, "width-only search", result.structure, time.perf_counter() - t0)
    if not done("peer", keep, "minitron_width"):
        structure, seconds = methods.structure("minitron_width", keep)
        add("peer", keep, "minitron_width", structure, seconds)
save()

command = " ".join(["python scripts/benchmark_depth.py", *map(shlex.quote, sys.argv[1:])])
stamp = json.loads(record_path.read_text())["date"]
lines = [START, "", f"### Depth check — {args.model}: removing fewer blocks at the same budget", "",
         f"Measured {stamp} on {machine_name(device)}. Calibration `{settings['calib']}` ({args.num_samples} x "
         f"{args.seq_len}), {args.steps} search steps; every row + reconstruction ({args.recon_samples} windows); "
         f"perplexity on the first {windows} windows of 2048 tokens of `{Path(args.eval_data).name}` (the peer "
         f"table's protocol). Check loss: KL + LM on the first 16 calibration windows, before the repair (what the "
         f"search's depth check compares; **bold** = its choice); held-out KL after repair: KL to the dense model "
         f"on {args.repair_check} calibration windows of 2048 tokens neither the search nor the repair read (← = "
         f"the candidate `dms-llm prune` keeps, its depth check after the repair). Command: `{command}`.", "",
         "| mode | keep | structure | attn / MLP blocks | params | check loss | held-out KL after repair | "
         "ppl + recon |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in sorted(rows, key=lambda r: (r["keep"], r["mode"])):
    name = f"**{r['variant']}**" if r.get("chosen") else r["variant"]
    name += " ← after repair" if r.get("chosen_after_repair") else ""
    loss = f"{r['check_loss']:.4f}" if r.get("check_loss") == r.get("check_loss") and "check_loss" in r else ""
    kl = f"{r['kl_repaired']:.4f}" if r.get("kl_repaired") is not None else ""
    lines.append(f"| {r['mode']} | {r['keep']} | {name} | {r['attn_blocks']} / {r['mlp_blocks']} | "
                 f"{r['params'] / 1e6:.2f}M | {loss} | {kl} | {r['ppl_recon']:.2f} |")
lines += ["", END]
md = replace_section(args.markdown, START, END, lines)
print(f"wrote {record_path} and {md}")
