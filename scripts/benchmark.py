"""Side-by-side benchmark: DMS against peer methods on the same model, data, windows and parameter budget, each
scored as it comes (no weight update, or its own retraining-free repair) and with dms-llm's reconstruction.

    python scripts/benchmark.py                                  # SmolLM2-135M, keep 0.8 and 0.5, WikiText-2 (Hub)
    python scripts/benchmark.py --calib DIR/wiki.valid.tokens --eval-data DIR/wiki.test.raw    # local WikiText-2
    python scripts/benchmark.py --methods flap sleb --keeps 0.8  # a subset
    python scripts/benchmark.py --windows 0                      # every evaluation window (GPU)

Perplexity: non-overlapping 2048-token windows of --eval-data (first 8 on a CPU). Rows named ``+recon`` are the same
structure after the reconstruction stage (``dms_llm.reconstruct``); ``flap`` carries FLAP's own bias compensation.
Writes benchmarks/results<tag>.json (one row per method, keep and repair), benchmarks/ppl_vs_params<tag>.png and the
marked section of BENCHMARKS.md (``--tag``: a separate set of these, e.g. for a subset of the methods).
Torch-Pruning runs in its own environment (scripts/run_torch_pruning.sh); its rows are
added from benchmarks/torch_pruning.json when they were scored on the same windows.
"""

import argparse
import datetime
import json
import logging
import shlex
import sys
from pathlib import Path

import torch
from bench_common import (  # a sibling module
    METHODS,
    PEERS,
    Methods,
    eval_windows,
    machine_name,
    protocol_windows,
    replace_section,
)

import dms_llm
from dms_llm.data import evaluation_tokens
from dms_llm.evaluation import speed, speed_ratios
from dms_llm.resources import count_parameters
from dms_llm.training import reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]
NO_RECON = ("random_uniform",)  # scored only as it comes

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.5])
parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
parser.add_argument("--windows", type=int, default=None,
                    help="first N eval windows (default: 8 on CPU, all on GPU; 0 = all)")
parser.add_argument("--steps", type=int, default=200, help="DMS search steps")
parser.add_argument("--repair-check", type=int, default=4,
                    help="held-out calibration windows on which the DMS depth check chooses after the repair, as "
                         "`dms-llm prune` does (0: the search's pre-repair choice)")
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--num-samples", type=int, default=64)
parser.add_argument("--recon-samples", type=int, default=32, help="calibration windows the reconstruction reads")
parser.add_argument("--calib", default="wikitext2", help="calibration text (Hub name or local file)")
parser.add_argument("--eval-data", default="wikitext2", help="perplexity text (Hub name or local file)")
parser.add_argument("--cache-dir", default=str(ROOT / ".bench-cache"),
                    help="where found structures are kept for the other benchmark scripts")
parser.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
parser.add_argument("--tag", default="",
                    help="a name for this run's outputs (results<tag>.json, ppl_vs_params<tag>.png, its BENCHMARKS "
                         "section), e.g. a subset of the methods on another machine")
args = parser.parse_args()
START, END = f"<!-- benchmark{args.tag}:start -->", f"<!-- benchmark{args.tag}:end -->"
logging.basicConfig(level=logging.WARNING)
reuse_freed_memory()

device = "cuda" if torch.cuda.is_available() else "cpu"
windows = eval_windows(args.windows, device)
model, tokenizer, _ = dms_llm.load_model(args.model, device=device)
calib, held_out = protocol_windows(tokenizer, args.calib, args.seq_len, args.num_samples, args.repair_check)
tokens = evaluation_tokens(tokenizer, args.eval_data)
machine = machine_name(device)
methods = Methods(model, calib, args.calib, args.steps, args.recon_samples, args.cache_dir, held_out=held_out)


def measure(name, keep, pruned, structure, seconds, recon_seconds=None):
    ppl = dms_llm.perplexity(pruned, tokens=tokens, max_windows=windows)
    sp = speed(pruned)
    row = {"method": name, "keep": keep, "params": count_parameters(pruned), "ppl_wikitext2": ppl["ppl"],
           "eval_windows": ppl["windows"], "eval_seq_len": ppl["seq_len"], "search_seconds": seconds,
           "reconstruct": recon_seconds is not None, "reconstruct_seconds": recon_seconds, "speed": sp}
    if structure is not None:
        row.update(speed_ratios(dense_speed, sp), structure=structure.summary())
    print(f"{name:22s} keep {keep}: params {row['params']:,} ppl {ppl['ppl']:.2f} search {seconds:.1f} s"
          + (f" recon {recon_seconds:.1f} s" if recon_seconds is not None else ""), flush=True)
    return row


dense_speed = speed(model)
rows = [measure("dense", 1.0, model, None, 0.0)]
for keep in args.keeps:
    for method in args.methods:
        for name in [method] if method in NO_RECON else [method, f"{method}+recon"]:
            pruned, structure, seconds, recon_seconds = methods.pruned(name, keep)
            rows.append(measure(name, keep, pruned, structure, seconds, recon_seconds))

out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
# Torch-Pruning runs in its own environment (scripts/run_torch_pruning.sh): its rows, when scored on these windows
external, tp_dense, tp_file = [], None, out / "torch_pruning.json"
if tp_file.exists():
    tp_rows = json.loads(tp_file.read_text())
    external = [{**r, "reconstruct": False} for r in tp_rows if r["method"] == "torch_pruning"
                and r["keep"] in args.keeps and r["eval_windows"] == rows[0]["eval_windows"]]
    tp_dense = next((r for r in tp_rows if r["method"].startswith("dense")), None)
stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
rows = [{**r, **{"date": stamp, "machine": machine}} for r in rows] + external
(out / f"results{args.tag}.json").write_text(json.dumps(rows, indent=1))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7.5, 4.8))
for name in sorted({r["method"] for r in rows}, key=lambda n: (n != "dense", not n.startswith("dms"), n)):
    pts = sorted((r["params"] / 1e6, r["ppl_wikitext2"]) for r in rows if r["method"] == name)
    ax.plot(*zip(*pts), marker="o", label=name, linestyle="-" if "+recon" in name or name == "dense" else "--")
ax.set_xlabel("parameters (M)")
ax.set_ylabel(f"WikiText-2 perplexity ({rows[0]['eval_windows']} x 2048 tokens)")
ax.set_yscale("log")
ax.grid(alpha=0.3)
ax.legend(fontsize=7, ncol=2)
ax.set_title(f"{args.model}: perplexity vs size, no gradient training (solid: + reconstruction)", fontsize=9)
fig.tight_layout()
fig.savefig(out / f"ppl_vs_params{args.tag}.png", dpi=110)

command = " ".join(["python scripts/benchmark.py", *map(shlex.quote, sys.argv[1:])])
lines = [START, "", f"### Peer comparison — {args.model}, no gradient training", "",
         f"Measured {stamp} on {machine}. Calibration: `{Path(args.calib).name}` ({args.num_samples} x "
         f"{args.seq_len} tokens; the reconstruction reads the first {args.recon_samples}); perplexity: "
         f"`{Path(args.eval_data).name}`, first {rows[0]['eval_windows']} windows of 2048 tokens. Speed: batch 1, "
         f"prompt 128, 32 decoded tokens, best of 3, same process. Command: `{command}`.",
         "", "| method | keep | params | ppl | search s | recon s | prefill x | decode x | decode ref (bytes) |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    recon = f"{r['reconstruct_seconds']:.1f}" if r.get("reconstruct_seconds") is not None else ""
    lines.append(f"| {r['method']} | {r['keep']} | {r['params'] / 1e6:.2f}M | {r['ppl_wikitext2']:.2f} | "
                 f"{r['search_seconds']:.1f} | {recon} | {r.get('prefill_speedup', 1):.2f} | "
                 f"{r.get('decode_speedup', 1):.2f} | {r.get('decode_reference', 1):.2f} |")
for keep in args.keeps:
    ours = [r for r in rows if r["method"].startswith("dms") and r["keep"] == keep]
    peers = [r for r in rows if r["method"].split("+")[0] in PEERS and r["keep"] == keep]
    if ours and peers:
        best, best_peer = (min(x, key=lambda r: r["ppl_wikitext2"]) for x in (ours, peers))
        ratio = best["ppl_wikitext2"] / best_peer["ppl_wikitext2"]
        lines += ["", f"keep {keep}: best DMS row ({best['method']}, {best['ppl_wikitext2']:.2f}) / best peer row "
                      f"({best_peer['method']}, {best_peer['ppl_wikitext2']:.2f}) = **{ratio:.2f}x**; "
                      f"dense {rows[0]['ppl_wikitext2']:.2f}."]
if external:
    lines += ["", f"torch_pruning rows: `bash scripts/run_torch_pruning.sh` in its own environment "
                  f"({external[0]['environment']}; Torch-Pruning's dependency graph never finishes on transformers "
                  f"5.x), measured {external[0]['date']} on {external[0]['machine']}, scored on the token ids of this "
                  f"environment (its dense model there: perplexity {tp_dense['ppl_wikitext2']:.2f}); speed ratios are "
                  f"against the dense model in that process."]
lines += ["", f"![perplexity vs parameters](benchmarks/ppl_vs_params{args.tag}.png)", "", END]
md = replace_section(args.markdown, START, END, lines)
print(f"wrote {out / f'results{args.tag}.json'}, {out / f'ppl_vs_params{args.tag}.png'} and {md}")
