"""Zero-shot benchmark: lm-eval's seven stock tasks (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA) on
the dense model, DMS (per-layer and uniform, with the reconstruction) and the best two peers of the perplexity
benchmark at one budget, and on the recovered models of the recovery benchmark's recipe at another.

    python scripts/benchmark_zeroshot.py --zeroshot-data DIR      # DIR/<task>/<split>.jsonl.gz; CPU: 100 docs/task
    python scripts/benchmark_zeroshot.py --zeroshot-data DIR --limit 0      # every document (GPU)
    python scripts/benchmark_zeroshot.py --zeroshot-data DIR --calib DIR2/wiki.valid.tokens --no-recovered

Reported as LLM-Pruner and the DMS paper do (acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm for HellaSwag, ARC-c,
OBQA) with lm-eval's standard errors and the number of documents scored. Structures come from the cache that
scripts/benchmark.py fills (--cache-dir), else they are searched here. Writes benchmarks/zeroshot.json,
benchmarks/zeroshot.png and the marked zero-shot section of BENCHMARKS.md.
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
from bench_common import Methods, best_peers, machine_name, replace_section  # a sibling module of this script

import dms_llm
from dms_llm.recovery import FinetuneConfig, finetune
from dms_llm.resources import count_parameters
from dms_llm.training import reuse_freed_memory
from dms_llm.zeroshot import DEFAULT_TASKS, check_tasks, zero_shot

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- zeroshot:start -->", "<!-- zeroshot:end -->"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--zeroshot-data", default=None, help="local task data (default: $DMS_LLM_ZEROSHOT_DATA, else Hub)")
parser.add_argument("--limit", type=int, default=None,
                    help="documents per task (default: 100 on CPU, all on GPU; 0 = all)")
parser.add_argument("--keep", type=float, default=0.8)
parser.add_argument("--recovered-keep", type=float, default=0.5)
parser.add_argument("--no-recovered", action="store_true", help="skip the recovered models")
parser.add_argument("--tokens", type=int, default=65_536, help="recovery budget (the recovery benchmark's recipe)")
parser.add_argument("--steps", type=int, default=200, help="DMS search steps")
parser.add_argument("--batch-size", default=None, help="lm-eval batch size (default: auto on GPU, 16 on CPU)")
parser.add_argument("--calib", default="wikitext2", help="calibration and recovery text (Hub name or local file)")
parser.add_argument("--cache-dir", default=str(ROOT / ".bench-cache"))
parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results.json"), help="to pick the best peers")
parser.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING)
reuse_freed_memory()

device = "cuda" if torch.cuda.is_available() else "cpu"
limit = args.limit if args.limit is not None else (None if device == "cuda" else 100)
limit = limit or None
batch = args.batch_size or ("auto" if device == "cuda" else "16")
batch = batch if batch == "auto" else int(batch)
manager = check_tasks(DEFAULT_TASKS, data_dir=args.zeroshot_data)  # before anything is loaded or searched
model, tokenizer, _ = dms_llm.load_model(args.model, device=device)
calib = dms_llm.calibration_windows(tokenizer, args.calib, 256, 64)
methods = Methods(model, calib, args.calib, args.steps, cache_dir=args.cache_dir)
machine = machine_name(device)
rows = []


def score(name: str, keep: float, pruned, note: str = "") -> None:
    t0 = time.perf_counter()
    results = zero_shot(pruned, tokenizer, DEFAULT_TASKS, batch_size=batch, limit=limit,
                        data_dir=args.zeroshot_data, manager=manager)
    rows.append({"method": name, "keep": keep, "params": count_parameters(pruned), "note": note,
                 "results": results, "seconds": time.perf_counter() - t0})
    print(f"{name:26s} keep {keep}: mean {100 * results['mean']['value']:.2f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)


score("dense", 1.0, model)
for name in ["dms_per_layer+recon", "dms_uniform+recon", *best_peers(args.results, args.keep)]:
    score(name, args.keep, methods.pruned(name, args.keep)[0])
if not args.no_recovered:
    train = dms_llm.calibration_windows(tokenizer, args.calib, 512, -(-args.tokens // 512), seed=1, allow_fewer=True)
    recipe = FinetuneConfig(tokens=args.tokens, mixed_precision="bf16" if device == "cuda" else "no")
    for name in ["dms_per_layer+recon", *best_peers(args.results, args.recovered_keep, n=1)]:
        pruned = methods.pruned(name, args.recovered_keep)[0]
        finetune(pruned, train, copy.deepcopy(recipe), teacher=model, progress=False)
        score(f"{name} + recovery", args.recovered_keep, pruned, f"{args.tokens:,} tokens of distillation")

stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "zeroshot.json").write_text(json.dumps({"date": stamp, "machine": machine, "limit": limit, "rows": rows},
                                              indent=1))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

labels = [*DEFAULT_TASKS, "mean"]
fig, ax = plt.subplots(figsize=(10, 4.2))
width = 0.8 / len(rows)
for i, r in enumerate(rows):
    ax.bar([x + i * width for x in range(len(labels))], [100 * r["results"][t]["value"] for t in labels], width,
           label=f"{r['method']} ({r['keep']})")
ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, fontsize=8)
ax.set_ylabel("accuracy (%)")
ax.legend(fontsize=7, ncol=2)
ax.grid(axis="y", alpha=0.3)
ax.set_title(f"{args.model}: zero-shot accuracy ({limit or 'all'} documents per task)", fontsize=10)
fig.tight_layout()
fig.savefig(out / "zeroshot.png", dpi=110)

names = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c", "openbookqa": "OBQA", "mean": "mean"}
command = " ".join(["python scripts/benchmark_zeroshot.py", *map(shlex.quote, sys.argv[1:])])
n_docs = {t: rows[0]["results"][t]["n"] for t in DEFAULT_TASKS}
lines = [START, "", f"### Zero-shot accuracy — {args.model}", "",
         f"Measured {stamp} on {machine}. lm-eval {__import__('lm_eval').__version__} stock tasks on local data, "
         f"zero-shot; acc for BoolQ, PIQA, WinoGrande, ARC-e and acc_norm for HellaSwag, ARC-c, OBQA (as LLM-Pruner "
         f"and the DMS paper report them), in %, ± lm-eval's standard error. Documents scored per task: "
         f"{', '.join(f'{names[t]} {n}' for t, n in n_docs.items())}"
         f"{' (the first ' + str(limit) + ' of each split: the full splits take hours on this CPU)' if limit else ''}. "
         f"Command: `{command}`.", "",
         "| model | keep | params | " + " | ".join(names[t] for t in labels) + " |",
         "| --- | --- | --- | " + " | ".join("---" for _ in labels) + " |"]
for r in rows:
    cells = [f"{100 * r['results'][t]['value']:.1f}" + (f" ± {100 * r['results'][t]['stderr']:.1f}"
                                                         if r["results"][t]["stderr"] is not None else "")
             for t in labels]
    lines.append(f"| {r['method']} | {r['keep']} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
lines += ["", "![zero-shot accuracy per task](benchmarks/zeroshot.png)", "", END]
md = replace_section(args.markdown, START, END, lines)
print(f"wrote {out / 'zeroshot.json'}, {out / 'zeroshot.png'} and {md}")
