"""Side-by-side benchmark: DMS against peer methods on the same model, data, windows and parameter budget, each
scored as it comes (no weight update, or its own retraining-free repair) and with dms-llm's reconstruction.

    python scripts/benchmark.py                                  # SmolLM2-135M, keep 0.8 and 0.5, WikiText-2 (Hub)
    python scripts/benchmark.py --calib DIR/wiki.valid.tokens --eval-data DIR/wiki.test.raw    # local WikiText-2
    python scripts/benchmark.py --methods flap sleb --keeps 0.8  # a subset
    python scripts/benchmark.py --windows 0                      # every evaluation window (GPU)
    python scripts/benchmark.py --methods dms_per_layer dms_uniform dms_auto --seeds 0 1 2   # the search's spread

Resumable: each finished row is appended to benchmarks/results<tag>.json as it ends, and a run of the same protocol
skips the rows already there (method, keep, DMS seed); rows of another protocol in that file are replaced. With
several ``--seeds`` each DMS row runs once per seed (the peers are deterministic) and the table shows the median
and the spread (max / min) of its perplexity.

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
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch
from bench_common import (  # a sibling module
    METHODS,
    PEERS,
    Methods,
    eval_windows,
    machine_name,
    parse_search_options,
    protocol_windows,
    replace_section,
    search_precision,
)

import dms_llm
from dms_llm.data import evaluation_tokens
from dms_llm.evaluation import speed, speed_ratios
from dms_llm.resources import count_parameters
from dms_llm.training import reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]
NO_RECON = ("random_uniform",)  # scored only as it comes


def method_order(name: str) -> int:
    """A sort key: the methods' order in METHODS, dense first."""
    base = name.removesuffix("+recon")
    return -1 if base == "dense" else METHODS.index(base) if base in METHODS else len(METHODS)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.5])
parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
parser.add_argument("--windows", type=int, default=None,
                    help="first N eval windows (default: 8 on CPU, all on GPU; 0 = all)")
parser.add_argument("--steps", type=int, default=200, help="DMS search steps")
parser.add_argument("--uniform-steps", type=int, default=None,
                    help="dms_auto: steps of its uniform search (default: the library's, as many as --steps)")
parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="DMS search seeds (each DMS row once per seed)")
parser.add_argument("--repair-check", type=int, default=4,
                    help="held-out calibration windows on which the DMS depth check chooses after the repair, as "
                         "`dms-llm prune` does (0: the search's pre-repair choice)")
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--num-samples", type=int, default=64)
parser.add_argument("--recon-samples", type=int, default=32, help="calibration windows the reconstruction reads")
parser.add_argument("--search-option", action="append", default=[], metavar="FIELD=VALUE",
                    help="a PruneConfig field for every DMS search, e.g. batch_size=4 (repeatable; a lever to screen)")
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
search_options = parse_search_options(args.search_option)  # (checked before anything loads)
START, END = f"<!-- benchmark{args.tag}:start -->", f"<!-- benchmark{args.tag}:end -->"
logging.basicConfig(level=logging.WARNING)
reuse_freed_memory()

device = "cuda" if torch.cuda.is_available() else "cpu"
windows = eval_windows(args.windows, device)
model, tokenizer, _ = dms_llm.load_model(args.model, device=device)
calib, held_out = protocol_windows(tokenizer, args.calib, args.seq_len, args.num_samples, args.repair_check)
tokens = evaluation_tokens(tokenizer, args.eval_data)
machine = machine_name(device)
methods = Methods(model, calib, args.calib, args.steps, args.recon_samples, args.cache_dir, held_out=held_out,
                  uniform_steps=args.uniform_steps, search_options=search_options)


protocol = {"model": args.model, "calib": Path(args.calib).name, "eval_data": Path(args.eval_data).name,
            "eval_windows": windows, "steps": args.steps, "seq_len": args.seq_len, "num_samples": args.num_samples,
            "recon_samples": args.recon_samples, "repair_check": args.repair_check}
if methods.search_options:  # (absent otherwise, so that rows of the default protocol stay comparable)
    protocol["search_options"] = methods.search_options
out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
results = out / f"results{args.tag}.json"
saved = json.loads(results.read_text()) if results.exists() else []
rows = [r for r in saved if r.get("protocol") == protocol and r["method"] != "torch_pruning"]
if len(rows) < len(saved):
    print(f"{results}: {len(saved) - len(rows)} rows of another protocol are replaced", flush=True)


def save_rows() -> None:
    """The rows so far, written atomically: an interrupted run keeps every finished row."""
    tmp = results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, results)


def done(name, keep, seed) -> bool:
    return any(r["method"] == name and r["keep"] == keep and r.get("seed") == seed for r in rows)


def measure(name, keep, pruned, structure, seconds, recon_seconds=None, seed=None):
    ppl = dms_llm.perplexity(pruned, tokens=tokens, max_windows=windows)
    sp = speed(pruned)
    row = {"method": name, "keep": keep, "seed": seed, "params": count_parameters(pruned),
           "ppl_wikitext2": ppl["ppl"], "eval_windows": ppl["windows"], "eval_seq_len": ppl["seq_len"],
           "search_seconds": seconds, "reconstruct": recon_seconds is not None, "reconstruct_seconds": recon_seconds,
           "speed": sp, "protocol": protocol,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine}
    if structure is not None:
        row.update(speed_ratios(dense_speed, sp), structure=structure.summary())
        if name.startswith("dms"):
            row["precision"] = search_precision()
    print(f"{name:22s} keep {keep}{'' if seed is None else f' seed {seed}'}: params {row['params']:,} "
          f"ppl {ppl['ppl']:.2f} search {seconds:.1f} s"
          + (f" recon {recon_seconds:.1f} s" if recon_seconds is not None else ""), flush=True)
    rows.append(row)
    save_rows()


dense_speed = speed(model)
if not done("dense", 1.0, None):
    measure("dense", 1.0, model, None, 0.0)
for keep in args.keeps:
    for method in args.methods:
        for seed in args.seeds if method.startswith("dms") else [None]:
            for name in [method] if method in NO_RECON else [method, f"{method}+recon"]:
                if done(name, keep, seed):
                    continue
                pruned, structure, seconds, recon_seconds = methods.pruned(name, keep, seed or 0)
                measure(name, keep, pruned, structure, seconds, recon_seconds, seed)
                del pruned

# Torch-Pruning runs in its own environment (scripts/run_torch_pruning.sh): its rows, when scored on these windows
external, tp_dense, tp_file = [], None, out / "torch_pruning.json"
dense_row = next(r for r in rows if r["method"] == "dense")
if tp_file.exists():
    tp_rows = json.loads(tp_file.read_text())
    external = [{**r, "reconstruct": False} for r in tp_rows if r["method"] == "torch_pruning"
                and r["keep"] in args.keeps and r["eval_windows"] == dense_row["eval_windows"]]
    tp_dense = next((r for r in tp_rows if r["method"].startswith("dense")), None)
rows = sorted(rows, key=lambda r: (r["keep"] != 1.0, -r["keep"], method_order(r["method"]), r.get("seed") or 0))
save_rows()
rows = rows + external


def groups():
    """(method, keep) -> its rows (one per seed), in table order."""
    found: dict = {}
    for r in rows:
        found.setdefault((r["method"], r["keep"]), []).append(r)
    return found


import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7.5, 4.8))
for name in sorted({r["method"] for r in rows}, key=lambda n: (n != "dense", not n.startswith("dms"), n)):
    pts = sorted((statistics.median(r["params"] for r in g) / 1e6, statistics.median(r["ppl_wikitext2"] for r in g))
                 for (m, _), g in groups().items() if m == name)
    ax.plot(*zip(*pts), marker="o", label=name, linestyle="-" if "+recon" in name or name == "dense" else "--")
ax.set_xlabel("parameters (M)")
ax.set_ylabel(f"WikiText-2 perplexity ({dense_row['eval_windows']} x 2048 tokens)")
ax.set_yscale("log")
ax.grid(alpha=0.3)
ax.legend(fontsize=7, ncol=2)
ax.set_title(f"{args.model}: perplexity vs size, no gradient training (solid: + reconstruction)", fontsize=9)
fig.tight_layout()
fig.savefig(out / f"ppl_vs_params{args.tag}.png", dpi=110)

command = " ".join(["python scripts/benchmark.py", *map(shlex.quote, sys.argv[1:])])
dates = sorted(r["date"] for r in rows if r.get("protocol") == protocol)
seeded = any(r.get("seed") is not None for r in rows)
lines = [START, "", f"### Peer comparison — {args.model}, no gradient training", "",
         f"Measured {dates[0]} – {dates[-1]} on {machine}. Calibration: `{Path(args.calib).name}` "
         f"({args.num_samples} x {args.seq_len} tokens; the reconstruction reads the first {args.recon_samples}); "
         f"perplexity: `{Path(args.eval_data).name}`, first {dense_row['eval_windows']} windows of 2048 tokens. "
         f"Speed: batch 1, prompt 128, 32 decoded tokens, best of 3, same process. Command: `{command}`."
         + (" DMS rows: the median over the seeds listed, spread = max / min." if seeded else ""),
         "", "| method | keep | seeds | params | ppl | spread | search s | recon s | prefill x | decode x | "
             "decode ref (bytes) |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def median_row(g):
    """The row of the median perplexity (the lower middle one for an even count), with the group's spread."""
    ranked = sorted(g, key=lambda r: r["ppl_wikitext2"])
    ppl = [r["ppl_wikitext2"] for r in ranked]
    return {**ranked[(len(ranked) - 1) // 2], "ppl_median": statistics.median(ppl), "spread": ppl[-1] / ppl[0],
            "seeds": [r.get("seed") for r in g]}


table = [median_row(g) for g in groups().values()]
for r in table:
    recon = f"{r['reconstruct_seconds']:.1f}" if r.get("reconstruct_seconds") is not None else ""
    seeds = ", ".join(str(x) for x in r["seeds"] if x is not None)
    spread = f"{r['spread']:.3f}" if len(r["seeds"]) > 1 else ""
    lines.append(f"| {r['method']} | {r['keep']} | {seeds} | {r['params'] / 1e6:.2f}M | {r['ppl_median']:.2f} | "
                 f"{spread} | {r['search_seconds']:.1f} | {recon} | {r.get('prefill_speedup', 1):.2f} | "
                 f"{r.get('decode_speedup', 1):.2f} | {r.get('decode_reference', 1):.2f} |")
for keep in args.keeps:
    ours = [r for r in table if r["method"].startswith("dms") and r["keep"] == keep]
    peers = [r for r in table if r["method"].split("+")[0] in PEERS and r["keep"] == keep]
    if ours and peers:
        best, best_peer = (min(x, key=lambda r: r["ppl_median"]) for x in (ours, peers))
        ratio = best["ppl_median"] / best_peer["ppl_median"]
        lines += ["", f"keep {keep}: best DMS row ({best['method']}, {best['ppl_median']:.2f}) / best peer row "
                      f"({best_peer['method']}, {best_peer['ppl_median']:.2f}) = **{ratio:.2f}x**; "
                      f"dense {dense_row['ppl_wikitext2']:.2f}."]
    formats = {r["method"]: r["ppl_median"] for r in ours if r["method"].endswith("+recon")}
    if {"dms_auto+recon", "dms_per_layer+recon", "dms_uniform+recon"} <= set(formats):
        better = min(formats["dms_per_layer+recon"], formats["dms_uniform+recon"])
        lines += ["", f"keep {keep}: `auto` + repair {formats['dms_auto+recon']:.2f} / the better of per-layer and "
                      f"uniform + repair ({better:.2f}) = **{formats['dms_auto+recon'] / better:.3f}x**."]
if external:
    lines += ["", f"torch_pruning rows: `bash scripts/run_torch_pruning.sh` in its own environment "
                  f"({external[0]['environment']}; Torch-Pruning's dependency graph never finishes on transformers "
                  f"5.x), measured {external[0]['date']} on {external[0]['machine']}, scored on the token ids of this "
                  f"environment (its dense model there: perplexity {tp_dense['ppl_wikitext2']:.2f}); speed ratios are "
                  f"against the dense model in that process."]
lines += ["", f"![perplexity vs parameters](benchmarks/ppl_vs_params{args.tag}.png)", "", END]
md = replace_section(args.markdown, START, END, lines)
print(f"wrote {results}, {out / f'ppl_vs_params{args.tag}.png'} and {md}")
