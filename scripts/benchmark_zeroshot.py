"""Zero-shot benchmark: lm-eval's seven stock tasks (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA) on
the dense model, DMS (per-layer and uniform, with the reconstruction) and the best two peers of the perplexity
benchmark at one budget, each pair of models compared on the same documents with paired bootstrap intervals.

    python scripts/benchmark_zeroshot.py --zeroshot-data DIR      # DIR/<task>/<split>.jsonl.gz; CPU: 300 docs/task
    python scripts/benchmark_zeroshot.py --zeroshot-data DIR --limit 0      # every document (GPU)
    python scripts/benchmark_zeroshot.py --zeroshot-data DIR --speed-check 40   # what the CPU run's settings cost

Reported as LLM-Pruner and the DMS paper do (acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm for HellaSwag, ARC-c,
OBQA). Every model scores the same documents (the first --limit of each split), so differences are paired: for each
DMS row against the dense model and each peer, the difference per task and of the seven-task mean with a 95% bootstrap
interval over documents (`dms_llm.zeroshot.paired_difference`). Resumable: each finished model is saved in
zeroshot.json at once, and each model's answers go to lm-eval's request cache (under --cache-dir) as they come, so a
run stopped in the middle of a model resumes at the request where it stopped. Structures come from the cache that
scripts/benchmark.py and scripts/benchmark_depth.py fill (--cache-dir), else they are searched here.

--speed-check N scores the dense model on the first N documents per task under each setting the CPU run could use
(float32 / bfloat16 weights, batch sizes) and reports the seconds, where the time goes (the model's forward calls
against lm-eval's own work) and how far each setting's scores are from the plain float32 run's on the same documents.
"""

import argparse
import copy
import datetime
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
from bench_common import (  # a sibling module of this script
    Methods,
    best_peers,
    machine_name,
    protocol_windows,
    replace_section,
)

import dms_llm
from dms_llm.recovery import FinetuneConfig, finetune
from dms_llm.resources import count_parameters
from dms_llm.training import reuse_freed_memory
from dms_llm.zeroshot import DEFAULT_TASKS, check_tasks, paired_difference, zero_shot

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- zeroshot:start -->", "<!-- zeroshot:end -->"
NAMES = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c", "openbookqa": "OBQA", "mean": "mean"}


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--zeroshot-data", default=None, help="local task data (default: $DMS_LLM_ZEROSHOT_DATA, else Hub)")
parser.add_argument("--limit", type=int, default=None,
                    help="documents per task, the same for every model (default: 300 on CPU, all on GPU; 0 = all)")
parser.add_argument("--keep", type=float, default=0.8)
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="weights while scoring (models are pruned and repaired in float32); default: bfloat16 on a "
                         "GPU, float32 on a CPU (bf16 changed 3.6%% of the documents' scores there for 1.5x: "
                         "BENCHMARKS.md, zero-shot scoring settings)")
parser.add_argument("--recovered", action="store_true",
                    help="also score the recovered models (the recovery benchmark's recipe) at --recovered-keep")
parser.add_argument("--recovered-keep", type=float, default=0.5)
parser.add_argument("--tokens", type=int, default=65_536, help="recovery budget (the recovery benchmark's recipe)")
parser.add_argument("--steps", type=int, default=200, help="DMS search steps")
parser.add_argument("--batch-size", default=None, help="lm-eval batch size (default: auto on GPU, 16 on CPU)")
parser.add_argument("--calib", default="wikitext2", help="calibration and recovery text (Hub name or local file)")
parser.add_argument("--speed-check", type=int, default=0, metavar="N",
                    help="only compare the scoring settings on the dense model's first N documents per task")
parser.add_argument("--cache-dir", default=str(ROOT / ".bench-cache"))
parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results.json"), help="to pick the best peers")
parser.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING)
reuse_freed_memory()

device = "cuda" if torch.cuda.is_available() else "cpu"
limit = args.limit if args.limit is not None else (None if device == "cuda" else 300)
limit = limit or None
batch = args.batch_size or ("auto" if device == "cuda" else "16")
batch = batch if batch == "auto" else int(batch)
dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
manager = check_tasks(DEFAULT_TASKS, data_dir=args.zeroshot_data)  # before anything is loaded or searched
model, tokenizer, _ = dms_llm.load_model(args.model, device=device)
machine = machine_name(device)
out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
request_cache = Path(args.cache_dir) / "zeroshot"


def scoring_copy(m, dt: str):
    """The model as it is scored: a copy in ``dt`` (the float32 original stays for pruning and as the teacher)."""
    return copy.deepcopy(m).to(getattr(torch, dt)).eval()


def timed_zero_shot(m, batch_size, docs, cache=None) -> tuple[dict, dict]:
    """Scores plus where the time went: seconds in all, and in the model's forward calls (lm-eval's ``_model_call``:
    everything else is lm-eval's tokenizing, batching and bookkeeping)."""
    from lm_eval.models.huggingface import HFLM

    forward = {"seconds": 0.0, "calls": 0}
    original = HFLM._model_call

    def counted(self, *a, **k):
        t = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            forward["seconds"] += time.perf_counter() - t
            forward["calls"] += 1

    HFLM._model_call = counted
    t0 = time.perf_counter()
    try:
        results = zero_shot(m, tokenizer, DEFAULT_TASKS, batch_size=batch_size, limit=docs,
                            data_dir=args.zeroshot_data, manager=manager, cache=cache)
    finally:
        HFLM._model_call = original
    return results, {"seconds": time.perf_counter() - t0, "forward_seconds": forward["seconds"],
                     "forward_calls": forward["calls"]}


if args.speed_check:  # ------------------------------------------------------------------------------------------
    settings = [("float32", 16), ("bfloat16", 16), ("bfloat16", 32), ("bfloat16", 64)]
    checks, plain = [], None
    for dt, bs in settings:
        results, cost = timed_zero_shot(scoring_copy(model, dt), bs, args.speed_check)
        plain = plain or results
        diff = paired_difference(results, plain)
        changed = sum(x != y for t in DEFAULT_TASKS for x, y in zip(results[t]["scores"], plain[t]["scores"]))
        checks.append({"dtype": dt, "batch_size": bs, **cost, "mean": results["mean"]["value"],
                       "changed_docs": changed, "mean_diff": diff["mean"]})
        print(f"{dt:9s} batch {bs:3d}: {cost['seconds']:7.1f} s ({cost['forward_seconds']:6.1f} s in the model), "
              f"mean {100 * results['mean']['value']:.2f}, {changed} of {7 * args.speed_check} documents scored "
              f"differently from {settings[0][0]} batch {settings[0][1]}", flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (out / "zeroshot_speed.json").write_text(json.dumps({"date": stamp, "machine": machine, "docs": args.speed_check,
                                                         "checks": checks}, indent=1))
    command = " ".join(["python scripts/benchmark_zeroshot.py", *map(shlex.quote, sys.argv[1:])])
    lines = ["<!-- zeroshot-speed:start -->", "", f"### Zero-shot scoring settings on this CPU — {args.model}", "",
             f"Measured {stamp} on {machine}, alone. The dense model on the first {args.speed_check} documents of "
             f"each of the seven tasks ({7 * args.speed_check} in all) under each setting; 'in the model' = seconds "
             f"inside the model's forward calls, the rest is lm-eval's own work; 'changed' = documents whose score "
             f"differs from the first row's, with the mean's paired difference and its 95% interval. "
             f"Command: `{command}`.", "",
             "| weights | batch | seconds | in the model | docs / s | mean (%) | changed docs | mean diff (points) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in checks:
        d = c["mean_diff"]
        lines.append(f"| {c['dtype']} | {c['batch_size']} | {c['seconds']:.1f} | {c['forward_seconds']:.1f} | "
                     f"{7 * args.speed_check / c['seconds']:.2f} | {100 * c['mean']:.2f} | {c['changed_docs']} | "
                     f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] |")
    lines += ["", "<!-- zeroshot-speed:end -->"]
    print(f"wrote {out / 'zeroshot_speed.json'} and {replace_section(args.markdown, lines[0], lines[-1], lines)}")
    sys.exit(0)

# --- the table -----------------------------------------------------------------------------------------------------
settings = {"model": args.model, "limit": limit, "dtype": dtype, "batch_size": batch, "tasks": list(DEFAULT_TASKS),
            "calib": Path(args.calib).name, "steps": args.steps, "lm_eval": __import__("lm_eval").__version__}
record_path = out / "zeroshot.json"
saved = json.loads(record_path.read_text()) if record_path.exists() else {}
rows = saved.get("rows", []) if saved.get("settings") == settings else []  # other settings: start afresh
calib, held_out = protocol_windows(tokenizer, args.calib)
methods = Methods(model, calib, args.calib, args.steps, cache_dir=args.cache_dir, held_out=held_out)


def save(comparisons=None) -> None:
    record = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine, "settings": settings, "rows": rows}
    if comparisons is not None:
        record["comparisons"] = comparisons
    record_path.write_text(json.dumps(record, indent=1))


def score(name: str, keep: float, build, note: str = "") -> None:
    """Score the model ``build()`` returns, unless this run (same settings) already has it."""
    if any(r["method"] == name and r["keep"] == keep for r in rows):
        print(f"{name:26s} keep {keep}: already scored", flush=True)
        return
    pruned = build()
    results, cost = timed_zero_shot(scoring_copy(pruned, dtype), batch, limit,
                                    cache=request_cache / f"{name}-keep{keep}".replace("+", "_"))
    rows.append({"method": name, "keep": keep, "params": count_parameters(pruned), "note": note,
                 "results": results, **cost})
    save()
    m = results["mean"]
    print(f"{name:26s} keep {keep}: mean {100 * m['value']:.2f} [{100 * m['low']:.2f}, {100 * m['high']:.2f}] "
          f"({cost['seconds']:.0f} s)", flush=True)


score("dense", 1.0, lambda: model)
peers = best_peers(args.results, args.keep)
for name in ["dms_per_layer+recon", "dms_uniform+recon", *peers]:
    score(name, args.keep, lambda name=name: methods.pruned(name, args.keep)[0])
if args.recovered:
    train = dms_llm.calibration_windows(tokenizer, args.calib, 512, -(-args.tokens // 512), seed=1, allow_fewer=True)
    recipe = FinetuneConfig(tokens=args.tokens, mixed_precision="bf16" if device == "cuda" else "no")

    def recovered(name):
        pruned = methods.pruned(name, args.recovered_keep)[0]
        finetune(pruned, train, copy.deepcopy(recipe), teacher=model, progress=False)
        return pruned

    for name in ["dms_per_layer+recon", *best_peers(args.results, args.recovered_keep, n=1)]:
        score(f"{name} + recovery", args.recovered_keep, lambda name=name: recovered(name),
              f"{args.tokens:,} tokens of distillation")

comparisons = []
for r in rows:
    if not r["method"].startswith("dms"):
        continue
    others = [o for o in rows if o["method"] == "dense" or
              (not o["method"].startswith("dms") and o["keep"] == r["keep"])]
    for o in others:
        comparisons.append({"a": r["method"], "a_keep": r["keep"], "b": o["method"], "b_keep": o["keep"],
                            "difference": paired_difference(r["results"], o["results"], DEFAULT_TASKS)})
save(comparisons)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

labels = [*DEFAULT_TASKS, "mean"]
fig, ax = plt.subplots(figsize=(10, 4.2))
width = 0.8 / len(rows)
for i, r in enumerate(rows):
    values = [100 * r["results"][t]["value"] for t in labels]
    m = r["results"]["mean"]
    err = [[0] * 7 + [100 * (m["value"] - m["low"])], [0] * 7 + [100 * (m["high"] - m["value"])]]
    ax.bar([x + i * width for x in range(len(labels))], values, width, yerr=err, capsize=2,
           label=f"{r['method']} ({r['keep']})")
ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, fontsize=8)
ax.set_ylabel("accuracy (%)")
ax.legend(fontsize=7, ncol=2)
ax.grid(axis="y", alpha=0.3)
ax.set_title(f"{args.model}: zero-shot accuracy ({limit or 'all'} documents per task; mean with its 95% interval)",
             fontsize=10)
fig.tight_layout()
fig.savefig(out / "zeroshot.png", dpi=110)

stamp = json.loads(record_path.read_text())["date"]
command = " ".join(["python scripts/benchmark_zeroshot.py", *map(shlex.quote, sys.argv[1:])])
n_docs = {t: rows[0]["results"][t]["n"] for t in DEFAULT_TASKS}


def ci(d: dict, key: str = "diff") -> str:
    return f"{100 * d[key]:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


lines = [START, "", f"### Zero-shot accuracy — {args.model}", "",
         f"Measured (last model) {stamp} on {machine}. lm-eval {settings['lm_eval']} stock tasks on local data, "
         f"zero-shot, {dtype} weights while scoring (pruned and repaired in float32), batch {batch}; acc for BoolQ, "
         f"PIQA, WinoGrande, ARC-e and acc_norm for HellaSwag, ARC-c, OBQA (as LLM-Pruner and the DMS paper report "
         f"them), in %. Documents per task, the same for every model: "
         f"{', '.join(f'{NAMES[t]} {n}' for t, n in n_docs.items())}"
         f"{' (the first ' + str(limit) + ' of each split)' if limit else ' (the full splits)'}. Mean: the seven "
         f"tasks' mean with its 95% bootstrap interval over documents. Seconds: scoring one model, alone on the "
         f"machine (its search and repair not included). Command: `{command}`.", "",
         "| model | keep | params | " + " | ".join(NAMES[t] for t in DEFAULT_TASKS) + " | mean [95%] | seconds |",
         "| --- | --- | --- | " + " | ".join("---" for _ in DEFAULT_TASKS) + " | --- | --- |"]
for r in rows:
    cells = [f"{100 * r['results'][t]['value']:.1f}" for t in DEFAULT_TASKS]
    m = r["results"]["mean"]
    lines.append(f"| {r['method']} | {r['keep']} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) +
                 f" | **{100 * m['value']:.1f}** [{100 * m['low']:.1f}, {100 * m['high']:.1f}] | {r['seconds']:.0f} |")
lines += ["", "Paired differences (points of accuracy, first model minus second, on the same documents; 95% paired "
          "bootstrap interval): an interval that excludes 0 is a difference these documents support.", "",
          "| comparison | " + " | ".join(NAMES[t] for t in labels) + " |",
          "| --- | " + " | ".join("---" for _ in labels) + " |"]
for c in comparisons:
    d = c["difference"]
    lines.append(f"| {c['a']} − {c['b']} | " + " | ".join(ci(d[t]) if t != "mean" else f"**{ci(d[t])}**"
                                                          for t in labels) + " |")
lines += ["", "![zero-shot accuracy per task](benchmarks/zeroshot.png)", "", END]
md = replace_section(args.markdown, START, END, lines)
print(f"wrote {record_path}, {out / 'zeroshot.png'} and {md}")
