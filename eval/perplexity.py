"""Perplexity of one or more models on the same windows (docs/DESIGN.md §5).

    python eval/perplexity.py smollm2-135m smollm2-dms --trust-remote-code --data wikitext2 --windows 16

``--data``: a Hub name (wikitext2, ptb, c4), a local text file (e.g. WikiText-2's wiki.test.raw) or pydoc-heldout.
"""

import argparse
import json

from dms_llm import load_model, perplexity
from dms_llm.data import evaluation_tokens

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("models", nargs="+", help="Hub ids, folders, .gguf files or smollm2-135m")
parser.add_argument("--data", default="wikitext2")
parser.add_argument("--seq-len", type=int, default=None)
parser.add_argument("--windows", type=int, default=None, help="first N windows only")
parser.add_argument("--trust-remote-code", action="store_true", help="needed for per-layer dms-llm exports")
parser.add_argument("--json", default=None)
args = parser.parse_args()

rows, tokens = [], None
for name in args.models:
    model, tokenizer, _ = load_model(name, trust_remote_code=args.trust_remote_code)
    tokens = evaluation_tokens(tokenizer, args.data) if tokens is None else tokens  # same tokenizer assumed
    r = perplexity(model, tokens=tokens, seq_len=args.seq_len, max_windows=args.windows)
    rows.append({"model": name, **r})
    print(f"{name}: ppl {r['ppl']:.3f} ({r['windows']}/{r['total_windows']} windows of {r['seq_len']}, "
          f"{r['seconds']:.0f} s)")
if args.json:
    with open(args.json, "w") as f:
        json.dump({"data": args.data, "results": rows}, f, indent=1)
