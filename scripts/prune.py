"""The `dms-llm prune` pipeline through the Python API: load, calibrate, search, export, evaluate.

    python scripts/prune.py --model smollm2-135m --keep 0.8 --out smollm2-dms
"""

import argparse
import logging

import dms_llm

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--keep", type=float, default=0.8)
parser.add_argument("--calib", default="pydoc")
parser.add_argument("--eval-data", default="pydoc-heldout")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--uniform", action="store_true")
parser.add_argument("--out", default="smollm2-dms")
parser.add_argument("--overwrite", action="store_true")
args = parser.parse_args()

model, tokenizer, source = dms_llm.load_model(args.model)
calib = dms_llm.calibration_windows(tokenizer, args.calib, seq_len=256, num_samples=64)
dense = dms_llm.evaluate(model, tokenizer, ppl_data=[args.eval_data])

result = dms_llm.prune(model, calib, dms_llm.PruneConfig(keep=args.keep, steps=args.steps, uniform=args.uniform))
print(result.structure.summary())

exported = dms_llm.export(model, result.structure, args.out, tokenizer=tokenizer, source_dir=source,
                          overwrite=args.overwrite)
pruned = dms_llm.evaluate(exported.model, tokenizer, ppl_data=[args.eval_data])

d, p = dense["perplexity"][args.eval_data], pruned["perplexity"][args.eval_data]
print(f"parameters {result.dense_resource:,} -> {result.pruned_resource:,}; "
      f"perplexity {d['ppl']:.2f} -> {p['ppl']:.2f} ({d['windows']} windows of {d['seq_len']}); "
      f"search {result.search_seconds:.0f} s; saved to {exported.path}")
