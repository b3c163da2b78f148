"""Run a dms-llm export and its GGUF side by side: greedy continuations of a few prompts in transformers and in
llama.cpp, and the max abs logit difference over the prompts and continuations (teacher-forced). Appends a row to
benchmarks/gguf_families.json.

    python scripts/random_model.py gemma3-270m /tmp/g && dms-llm prune /tmp/g --keep 0.8 --format uniform \\
        --steps 10 --num-samples 16 --no-eval --gguf f32 --out /tmp/g-pruned
    python scripts/check_gguf_export.py /tmp/g-pruned /tmp/g-pruned-f32.gguf --label gemma3-270m-shape
"""

import argparse
import datetime
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dms_llm.gguf_export import llama_logits, open_llama

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The history of the city begins", "def fibonacci(n):", "In 1969, three astronauts"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("gguf")
    parser.add_argument("--label", required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gguf_families.json"))
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32, trust_remote_code=True).eval()
    llm = open_llama(Path(args.gguf), n_ctx=256, threads=2)
    rows = []
    try:
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id] + ids
            with torch.no_grad():
                hf = model.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False)[0].tolist()
            cpp = list(ids)
            for _ in range(args.new_tokens):  # greedy, one full forward per token (what the check compares)
                cpp.append(int(llama_logits(llm, cpp)[-1].argmax()))
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([hf])).logits[0].float()
            diff = float((llama_logits(llm, hf) - expected).abs().max())
            rows.append({"prompt": prompt, "same_greedy_tokens": hf == cpp, "max_abs_logit_diff": round(diff, 5),
                         "max_abs_logit": round(float(expected.abs().max()), 3)})
            print(rows[-1], flush=True)
    finally:
        llm.close()
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else []
    saved = [r for r in saved if r["label"] != args.label] + [{
        "label": args.label, "folder": args.folder, "gguf": Path(args.gguf).name, "prompts": rows,
        "architecture": json.loads((Path(args.folder) / "config.json").read_text())["model_type"],
        "date": datetime.date.today().isoformat()}]
    out.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
