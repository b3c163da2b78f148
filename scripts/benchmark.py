"""Side-by-side benchmark: DMS against peer methods on the same model, data, windows and budget.

    python scripts/benchmark.py                       # SmolLM2-135M, --keep 0.8 and 0.5, CPU: first 8 windows
    python scripts/benchmark.py --windows 0           # all windows (GPU)

Calibrates on --calib and scores perplexity on --eval-data (defaults: WikiText-2 from the Hub; without network pass
local copies, e.g. --calib DIR/wiki.valid.tokens --eval-data DIR/wiki.test.raw; non-overlapping 2048-token windows),
measures search wall time and prefill / decode speed against the dense model, then writes benchmarks/results.json,
benchmarks/ppl_vs_params.png and the marked section of BENCHMARKS.md.
No method updates weights. Torch-Pruning runs in its own environment (scripts/run_torch_pruning.sh, transformers
4.48.3); its rows are added from benchmarks/torch_pruning.json when present.
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
from bench_common import eval_windows, machine_name, replace_section  # noqa: E402  (a sibling module of this script)

import dms_llm
from dms_llm.baselines import random_uniform, shortgpt, taylor_uniform
from dms_llm.data import evaluation_tokens
from dms_llm.evaluation import speed, speed_ratios
from dms_llm.resources import ResourceModel, count_parameters
from dms_llm.structure import ModelShape

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dms_per_layer", "dms_uniform", "taylor_uniform", "shortgpt", "random_uniform")
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.5])
parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
parser.add_argument("--windows", type=int, default=None,
                    help="first N eval windows (default: 8 on CPU, all on GPU; 0 = all)")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--num-samples", type=int, default=64)
parser.add_argument("--calib", default="wikitext2", help="calibration text (Hub name or local file)")
parser.add_argument("--eval-data", default="wikitext2", help="perplexity text (Hub name or local file)")
parser.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING)

device = "cuda" if torch.cuda.is_available() else "cpu"
windows = eval_windows(args.windows, device)
model, tokenizer, _ = dms_llm.load_model(args.model, device=device)
shape = ModelShape.from_model(model)
calib = dms_llm.calibration_windows(tokenizer, args.calib, args.seq_len, args.num_samples)
tokens = evaluation_tokens(tokenizer, args.eval_data)
machine = machine_name(device)


def measure(name, keep, structure, seconds):
    pruned = model if structure is None else dms_llm.build_pruned_model(model, structure)
    ppl = dms_llm.perplexity(pruned, tokens=tokens, max_windows=windows)
    sp = speed(pruned)
    row = {"method": name, "keep": keep, "params": count_parameters(pruned), "ppl_wikitext2": ppl["ppl"],
           "eval_windows": ppl["windows"], "eval_seq_len": ppl["seq_len"], "search_seconds": seconds, "speed": sp}
    if structure is not None:
        row.update(speed_ratios(dense_speed, sp))
        row["structure"] = structure.summary()
    print(f"{name:16s} keep {keep}: params {row['params']:,} ppl {ppl['ppl']:.2f} search {seconds:.1f} s "
          f"decode x{row.get('decode_speedup', 1):.2f}", flush=True)
    return row


dense_speed = speed(model)
rows = [measure("dense", 1.0, None, 0.0)]
for keep in args.keeps:
    target = dms_llm.PruneConfig(keep=keep).resolve_target(ResourceModel(shape))
    for method in args.methods:
        t0 = time.perf_counter()
        if method.startswith("dms"):
            cfg = dms_llm.PruneConfig(keep=keep, steps=args.steps, uniform=method == "dms_uniform")
            structure = dms_llm.prune(model, calib, cfg, progress=False).structure
        elif method == "taylor_uniform":
            structure = taylor_uniform(model, calib, target)
        elif method == "shortgpt":
            structure = shortgpt(model, calib, target)
        else:
            structure = random_uniform(model, target)
        rows.append(measure(method, keep, structure, time.perf_counter() - t0))

out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
# Torch-Pruning runs in its own environment (scripts/run_torch_pruning.sh): add its rows when they were scored on
# the same windows
external, tp_file = [], out / "torch_pruning.json"
if tp_file.exists():
    tp_rows = json.loads(tp_file.read_text())
    external = [r for r in tp_rows if r["method"] == "torch_pruning" and r["keep"] in args.keeps
                and r["eval_windows"] == rows[0]["eval_windows"]]
    tp_dense = next((r for r in tp_rows if r["method"].startswith("dense")), None)
stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
rows = [{**r, **{"date": stamp, "machine": machine}} for r in rows] + external
(out / "results.json").write_text(json.dumps(rows, indent=1))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6.5, 4.2))
for method in ["dense", *args.methods, *(["torch_pruning"] if external else [])]:
    pts = sorted((r["params"] / 1e6, r["ppl_wikitext2"]) for r in rows if r["method"] == method)
    ax.plot(*zip(*pts), marker="o", label=method)
ax.set_xlabel("parameters (M)")
ax.set_ylabel(f"WikiText-2 perplexity ({rows[0]['eval_windows']} x 2048 tokens)")
ax.set_yscale("log")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
ax.set_title(f"{args.model}: perplexity vs size, no weight update", fontsize=10)
fig.tight_layout()
fig.savefig(out / "ppl_vs_params.png", dpi=110)

lines = [START, "", f"### Peer comparison — {args.model}, no weight update", "",
         f"Measured {stamp} on {machine}. Calibration: `{Path(args.calib).name}` ({args.num_samples} x "
         f"{args.seq_len} tokens); perplexity: `{Path(args.eval_data).name}` file text, first "
         f"{rows[0]['eval_windows']} windows of 2048 tokens. "
         f"Speed: batch 1, prompt 128, 32 decoded tokens, best of 3, same process. "
         f"Command: `{' '.join(['python scripts/benchmark.py', *map(shlex.quote, sys.argv[1:])])}`. "
         f"taylor_uniform follows LLM-Pruner's recipe (first 4 and last 2 layers dense, the others equally narrowed "
         f"by first-order Taylor importance); shortgpt removes whole layers by Block Influence.",
         "", "| method | keep | params | ppl | search s | prefill x | decode x | decode ref (bytes) |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    lines.append(f"| {r['method']} | {r['keep']} | {r['params'] / 1e6:.2f}M | {r['ppl_wikitext2']:.2f} | "
                 f"{r['search_seconds']:.1f} | {r.get('prefill_speedup', 1):.2f} | {r.get('decode_speedup', 1):.2f} | "
                 f"{r.get('decode_reference', 1):.2f} |")
PEERS = ("taylor_uniform", "shortgpt", "random_uniform", "torch_pruning")
for keep in args.keeps:
    dms = next((r for r in rows if r["method"] == "dms_per_layer" and r["keep"] == keep), None)
    peers = [r for r in rows if r["method"] in PEERS and r["keep"] == keep]
    if dms and peers:
        best = min(peers, key=lambda r: r["ppl_wikitext2"])
        ratio = dms["ppl_wikitext2"] / best["ppl_wikitext2"]
        lines += ["", f"keep {keep}: DMS per-layer perplexity / best baseline ({best['method']}) = **{ratio:.2f}x** "
                      f"(goal <= 0.6x: {'met' if ratio <= 0.6 else 'not met'})."]
if external:
    lines += ["", f"torch_pruning rows: `bash scripts/run_torch_pruning.sh` in its own environment "
                  f"({external[0]['environment']}; Torch-Pruning's dependency graph never finishes on transformers "
                  f"5.x), measured {external[0]['date']} on {external[0]['machine']}, scored on the token ids of this "
                  f"environment (its dense model there: perplexity {tp_dense['ppl_wikitext2']:.2f}); speed ratios are "
                  f"against the dense model in that process. Its recipe: group L2 magnitude, one ratio for hidden "
                  f"size, query heads and MLP width, bisected to the budget, no calibration data."]
else:
    lines += ["", "torch_pruning: not measured in this run (run `bash scripts/run_torch_pruning.sh` first)."]
lines += ["", "![perplexity vs parameters](benchmarks/ppl_vs_params.png)", "", END]
md = replace_section(args.markdown, START, END, lines)
print(f"wrote {out / 'results.json'}, {out / 'ppl_vs_params.png'} and {md}")
