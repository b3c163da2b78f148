"""Recovery benchmark: prune SmolLM2-135M to --keep 0.5 with DMS and with the peer baselines, give every pruned
model the same recovery (distillation from the dense model, same tokens, same settings), and compare perplexity
before and after.

    python scripts/benchmark_recovery.py                    # CPU: 65,536 recovery tokens, first 8 eval windows
    python scripts/benchmark_recovery.py --tokens 2000000 --windows 0     # GPU: a larger budget, all windows

Search calibration and recovery text: --calib; perplexity: --eval-data (non-overlapping 2048-token windows) — the
same protocol and defaults as scripts/benchmark.py. Writes
benchmarks/recovery.json and the marked recovery section of BENCHMARKS.md.
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
from bench_common import eval_windows, machine_name, replace_section  # noqa: E402  (a sibling module of this script)

import dms_llm
from dms_llm.baselines import shortgpt, taylor_uniform
from dms_llm.data import evaluation_tokens
from dms_llm.recovery import FinetuneConfig, finetune
from dms_llm.resources import ResourceModel, count_parameters
from dms_llm.structure import ModelShape

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dms_per_layer", "dms_uniform", "shortgpt", "taylor_uniform")
START, END = "<!-- recovery:start -->", "<!-- recovery:end -->"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--keep", type=float, default=0.5)
parser.add_argument("--methods", nargs="+", default=["dms_per_layer", "shortgpt", "taylor_uniform"], choices=METHODS)
parser.add_argument("--tokens", type=int, default=65_536, help="recovery budget per model (tokens)")
parser.add_argument("--seq-len", type=int, default=512, help="recovery sequence length")
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--lr", type=float, default=None, help="default: the library default for the mode")
parser.add_argument("--lora", action="store_true", help="recover with merged LoRA adapters instead of all weights")
parser.add_argument("--windows", type=int, default=None,
                    help="first N eval windows (default: 8 on CPU, all on GPU; 0 = all)")
parser.add_argument("--steps", type=int, default=200, help="DMS search steps")
parser.add_argument("--calib", default="wikitext2", help="calibration text (Hub name or local file)")
parser.add_argument("--eval-data", default="wikitext2", help="perplexity text (Hub name or local file)")
parser.add_argument("--out", default=str(ROOT / "benchmarks" / "recovery.json"))
parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING)

device = "cuda" if torch.cuda.is_available() else "cpu"
windows = eval_windows(args.windows, device)
model, tokenizer, _ = dms_llm.load_model(args.model, device=device)
shape = ModelShape.from_model(model)
calib = dms_llm.calibration_windows(tokenizer, args.calib, 256, 64)
train = dms_llm.calibration_windows(tokenizer, args.calib, args.seq_len, -(-args.tokens // args.seq_len), seed=1,
                                    allow_fewer=True)
tokens = evaluation_tokens(tokenizer, args.eval_data)
machine = machine_name(device)
recovery = FinetuneConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, lora=args.lora,
                          mixed_precision="bf16" if device == "cuda" else "no")
target = dms_llm.PruneConfig(keep=args.keep).resolve_target(ResourceModel(shape))


def ppl(m):
    return dms_llm.perplexity(m, tokens=tokens, max_windows=windows)


dense_ppl = ppl(model)
print(f"dense: ppl {dense_ppl['ppl']:.2f}", flush=True)
rows = []
for method in args.methods:
    t0 = time.perf_counter()
    if method.startswith("dms"):
        cfg = dms_llm.PruneConfig(keep=args.keep, steps=args.steps, uniform=method == "dms_uniform")
        structure = dms_llm.prune(model, calib, cfg, progress=False).structure
    elif method == "shortgpt":
        structure = shortgpt(model, calib, target)
    else:
        structure = taylor_uniform(model, calib, target)
    search = time.perf_counter() - t0
    pruned = dms_llm.build_pruned_model(model, structure)
    before = ppl(pruned)["ppl"]
    result = finetune(pruned, train, copy.deepcopy(recovery), teacher=model, progress=False)
    after = ppl(pruned)["ppl"]
    rows.append({"method": method, "keep": args.keep, "params": count_parameters(pruned), "ppl_before": before,
                 "ppl_after": after, "search_seconds": search, "recovery_seconds": result.seconds,
                 "recovery_tokens": result.tokens_seen, "final_kl": result.history[-1]["kl"]})
    print(f"{method:16s}: params {rows[-1]['params']:,} ppl {before:.2f} -> {after:.2f} "
          f"(search {search:.0f} s, recovery {result.seconds:.0f} s)", flush=True)

stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
setting = {"recovery": {**vars(recovery), "lr": recovery.learning_rate(), "seq_len": args.seq_len,
                        "windows_available": len(train)},
           "eval_windows": dense_ppl["windows"], "dense_ppl": dense_ppl["ppl"], "date": stamp, "machine": machine}
out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({"setting": setting, "rows": rows}, indent=1))

dms = next((r for r in rows if r["method"] == "dms_per_layer"), None)
peers = [r for r in rows if not r["method"].startswith("dms")]
best = min(peers, key=lambda r: r["ppl_after"]) if peers else None
mode = "LoRA (merged)" if args.lora else "all weights"
lines = [START, "", f"### Recovery at keep {args.keep} — {args.model}", "",
         f"Measured {stamp} on {machine}. Every pruned model gets the same recovery: distillation (KL to the dense "
         f"model's logits) on {rows[0]['recovery_tokens']:,} tokens of `{Path(args.calib).name}` "
         f"({args.batch_size} x {args.seq_len}-token windows, {mode}, AdamW lr {recovery.learning_rate():g}, cosine, "
         f"5% warm-up). Perplexity: `{Path(args.eval_data).name}`, first {dense_ppl['windows']} windows of 2048 tokens "
         f"(dense {dense_ppl['ppl']:.2f}). Command: "
         f"`{' '.join(['python scripts/benchmark_recovery.py', *map(shlex.quote, sys.argv[1:])])}`.",
         "", "| method | params | ppl before | ppl after recovery | search s | recovery s |",
         "| --- | --- | --- | --- | --- | --- |"]
for r in rows:
    lines.append(f"| {r['method']} | {r['params'] / 1e6:.2f}M | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | "
                 f"{r['search_seconds']:.1f} | {r['recovery_seconds']:.1f} |")
if dms and best:
    ratio = dms["ppl_after"] / best["ppl_after"]
    lines += ["", f"DMS per-layer + recovery / best baseline ({best['method']}) + the same recovery: "
                  f"**{ratio:.2f}x** the perplexity (goal <= 0.85x: {'met' if ratio <= 0.85 else 'not met'})."]
lines += ["", END]
md = replace_section(args.markdown, START, END, lines)
print(f"wrote {out} and {md}")
