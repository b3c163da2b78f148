"""Recovery benchmark: the same distillation recovery (from the dense model, same tokens, same settings) for DMS and
for the best peers, starting from the repaired models (``+recon`` rows), and perplexity before and after.

    python scripts/benchmark_recovery.py                                 # keep 0.8 and 0.5, 65,536 tokens (CPU)
    python scripts/benchmark_recovery.py --calib DIR/wiki.valid.tokens --eval-data DIR/wiki.test.raw
    python scripts/benchmark_recovery.py --tokens 2000000 --windows 0    # GPU: a larger budget, all windows

Methods: DMS per-layer + reconstruction and the best two peer rows of scripts/benchmark.py at each keep (its
benchmarks/results.json; FLAP and Minitron-width + reconstruction when there is none), or --methods. Structures come
from the cache scripts/benchmark.py fills (--cache-dir), else they are searched here. Search calibration and recovery
text: --calib; perplexity: --eval-data, non-overlapping 2048-token windows. Writes benchmarks/recovery.json and the
marked recovery section of BENCHMARKS.md; rows of budgets not in --keeps stay there when an earlier run had the same
setting (so one budget can be rerun alone).
"""

import argparse
import copy
import datetime
import json
import logging
import shlex
import sys
from pathlib import Path

import torch
from bench_common import (  # a sibling module
    Methods,
    best_peers,
    eval_windows,
    machine_name,
    protocol_windows,
    replace_section,
)

import dms_llm
from dms_llm.data import evaluation_tokens
from dms_llm.recovery import FinetuneConfig, finetune
from dms_llm.resources import count_parameters
from dms_llm.training import reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- recovery:start -->", "<!-- recovery:end -->"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.5])
parser.add_argument("--methods", nargs="+", default=None, help="default: dms_per_layer+recon and the best two peers")
parser.add_argument("--tokens", type=int, default=65_536, help="recovery budget per model (tokens)")
parser.add_argument("--seq-len", type=int, default=512, help="recovery sequence length")
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--lr", type=float, default=None, help="default: the library default for the mode")
parser.add_argument("--lora", action="store_true", help="recover with merged LoRA adapters instead of all weights")
parser.add_argument("--windows", type=int, default=None,
                    help="first N eval windows (default: 8 on CPU, all on GPU; 0 = all)")
parser.add_argument("--steps", type=int, default=200, help="DMS search steps")
parser.add_argument("--calib", default="wikitext2", help="calibration and recovery text (Hub name or local file)")
parser.add_argument("--eval-data", default="wikitext2", help="perplexity text (Hub name or local file)")
parser.add_argument("--cache-dir", default=str(ROOT / ".bench-cache"))
parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results.json"), help="to pick the best peers")
parser.add_argument("--out", default=str(ROOT / "benchmarks" / "recovery.json"))
parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING)
reuse_freed_memory()

device = "cuda" if torch.cuda.is_available() else "cpu"
windows = eval_windows(args.windows, device)
model, tokenizer, _ = dms_llm.load_model(args.model, device=device)
calib, held_out = protocol_windows(tokenizer, args.calib)
train = dms_llm.calibration_windows(tokenizer, args.calib, args.seq_len, -(-args.tokens // args.seq_len), seed=1,
                                    allow_fewer=True)
tokens = evaluation_tokens(tokenizer, args.eval_data)
machine = machine_name(device)
recovery = FinetuneConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, lora=args.lora,
                          mixed_precision="bf16" if device == "cuda" else "no")
methods = Methods(model, calib, args.calib, args.steps, cache_dir=args.cache_dir, held_out=held_out)


def ppl(m):
    return dms_llm.perplexity(m, tokens=tokens, max_windows=windows)


dense_ppl = ppl(model)
print(f"dense: ppl {dense_ppl['ppl']:.2f}", flush=True)
stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
setting = {"recovery": {**vars(recovery), "lr": recovery.learning_rate(), "seq_len": args.seq_len,
                        "windows_available": len(train)},
           "eval_windows": dense_ppl["windows"], "dense_ppl": dense_ppl["ppl"], "machine": machine}
out = Path(args.out)
# Rows of other budgets from an earlier run with the same setting stay (rerun one keep without losing the other).
earlier = json.loads(out.read_text()) if out.exists() else {}
same = {k: v for k, v in earlier.get("setting", {}).items() if k != "date"} == setting
kept_rows = [{"date": earlier["setting"].get("date"), **r} for r in earlier.get("rows", []) if same
             and r["keep"] not in args.keeps]
rows = []
for keep in args.keeps:
    for name in args.methods or ["dms_per_layer+recon", *best_peers(args.results, keep)]:
        pruned, structure, search, recon = methods.pruned(name, keep)
        before = ppl(pruned)["ppl"]
        result = finetune(pruned, train, copy.deepcopy(recovery), teacher=model, progress=False)
        after = ppl(pruned)["ppl"]
        rows.append({"method": name, "keep": keep, "params": count_parameters(pruned), "ppl_before": before,
                     "ppl_after": after, "date": stamp, "search_seconds": search, "reconstruct_seconds": recon,
                     "recovery_seconds": result.seconds, "recovery_tokens": result.tokens_seen,
                     "final_kl": result.history[-1]["kl"]})
        print(f"{name:24s} keep {keep}: params {rows[-1]['params']:,} ppl {before:.2f} -> {after:.2f} "
              f"(recovery {result.seconds:.0f} s)", flush=True)

rows = sorted(kept_rows + rows, key=lambda r: -r["keep"])  # stable: each keep's methods in their order
keeps = list(dict.fromkeys(r["keep"] for r in rows))
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({"setting": {**setting, "date": stamp}, "rows": rows}, indent=1))

mode = "LoRA (merged)" if args.lora else "all weights"
command = " ".join(["python scripts/benchmark_recovery.py", *map(shlex.quote, sys.argv[1:])])
lines = [START, "", f"### Recovery — {args.model}", "",
         f"Measured {stamp} on {machine}. Every pruned model gets the same recovery: distillation (KL to the dense "
         f"model's logits) on {rows[0]['recovery_tokens']:,} tokens of `{Path(args.calib).name}` "
         f"({args.batch_size} x {args.seq_len}-token windows, {mode}, AdamW lr {recovery.learning_rate():g}, cosine, "
         f"5% warm-up), starting from the model as the method leaves it (`+recon`: after dms-llm's reconstruction). "
         f"Perplexity: `{Path(args.eval_data).name}`, first {dense_ppl['windows']} windows of 2048 tokens (dense "
         f"{dense_ppl['ppl']:.2f}). Command: `{command}`"
         + (f" (rows of keep {', '.join(str(k) for k in keeps if k not in args.keeps)} are from an earlier run with "
            f"the same setting: see their date)." if kept_rows else "."),
         "", "| method | keep | params | ppl before | ppl after recovery | after / dense | recovery s | measured |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    lines.append(f"| {r['method']} | {r['keep']} | {r['params'] / 1e6:.2f}M | {r['ppl_before']:.2f} | "
                 f"{r['ppl_after']:.2f} | {r['ppl_after'] / dense_ppl['ppl']:.2f}x | {r['recovery_seconds']:.1f} | "
                 f"{r['date']} |")
for keep in keeps:
    dms = next((r for r in rows if r["method"].startswith("dms_per_layer") and r["keep"] == keep), None)
    peers = [r for r in rows if not r["method"].startswith("dms") and r["keep"] == keep]
    if dms and peers:
        best = min(peers, key=lambda r: r["ppl_after"])
        lines += ["", f"keep {keep}: DMS + recovery {dms['ppl_after']:.2f} ({dms['ppl_after'] / dense_ppl['ppl']:.2f}x "
                      f"dense) / best peer + the same recovery ({best['method']}, {best['ppl_after']:.2f}) = "
                      f"**{dms['ppl_after'] / best['ppl_after']:.2f}x**."]
lines += ["", END]
md = replace_section(args.markdown, START, END, lines)
print(f"wrote {out} and {md}")
