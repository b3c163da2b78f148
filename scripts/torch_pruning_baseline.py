"""Torch-Pruning baseline, run in its own environment (transformers 4.48.3: Torch-Pruning 1.6.1's dependency
graph never finishes on transformers 5.x). Self-contained: it does not import dms_llm.

    bash scripts/run_torch_pruning.sh          # builds the venv, tokenizes the eval text, runs this, writes JSON

Recipe of Torch-Pruning's LLM example (examples/LLMs/prune_llm.py): MetaPruner, group L2 magnitude importance
(mean over the group), uniform ratio for hidden size, query heads and MLP width, head dims kept, round_to=4,
lm_head ignored, no calibration data. The ratio is bisected so that the parameter count meets each budget
(``floor(keep * dense)``, embeddings included, as for every other method). Perplexity is computed on the token
ids that the main environment wrote (same tokens and 2048-token windows as scripts/benchmark.py); speed with the
same batch / prompt / decode lengths, dense and pruned in this process.

Checked by hand (2026-11-28): the kept hidden channels are sliced consistently from embeddings, norms, every
projection and the LM head; the perplexity collapse is the recipe's — removing only the 12 lowest-magnitude
hidden channels of SmolLM2 (ratio 0.02) raises perplexity from 19 to 277, and at that ratio its GQA head pruning
already drops 3 of the 9 query heads.
"""

import argparse
import copy
import datetime
import json
import math
import platform
import time

import torch
import torch.nn.functional as F
import torch_pruning as tp
from transformers import AutoModelForCausalLM, DynamicCache

parser = argparse.ArgumentParser()
parser.add_argument("--model-dir", required=True, help="folder of the GGUF (or a HF checkpoint)")
parser.add_argument("--gguf", default=None)
parser.add_argument("--tokens", required=True, help=".pt file of evaluation token ids (1-D)")
parser.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.5])
parser.add_argument("--windows", type=int, default=8)
parser.add_argument("--out", required=True)
args = parser.parse_args()
torch.manual_seed(0)


def n_params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def perplexity(model, tokens, windows, seq_len=2048):
    n = min(windows, len(tokens) // seq_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            ids = tokens[i * seq_len:(i + 1) * seq_len][None]
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += seq_len - 1
    return math.exp(nll / count), n


def speed(model, prompt_len=128, new_tokens=32, repeats=3):
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    best_p = best_d = float("inf")
    with torch.no_grad():
        for run in range(repeats + 1):
            t0 = time.perf_counter()
            out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
            t1 = time.perf_counter()
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            if run:
                best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {"prefill_tokens_per_s": prompt_len / best_p, "decode_tokens_per_s": new_tokens / best_d,
            "weight_bytes": weight_bytes}


def torch_pruning(dense, ratio):
    """Torch-Pruning's LLM recipe at one uniform ratio; returns the pruned copy with its config updated."""
    model = copy.deepcopy(dense)
    cfg = model.config
    gqa = cfg.num_attention_heads != cfg.num_key_value_heads
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    example = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4,
        output_transform=lambda out: out.logits,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    emb, head = model.get_input_embeddings(), model.lm_head
    if cfg.tie_word_embeddings and torch.equal(emb.weight, head.weight):
        head.weight = emb.weight  # slicing leaves two equal copies of the tied matrix: keep one, as the dense model
    cfg.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            heads = m.q_proj.out_features // m.head_dim
            cfg.num_attention_heads = heads
            if not gqa:
                cfg.num_key_value_heads = heads
            m.num_key_value_groups = heads // (m.k_proj.out_features // m.head_dim)
        elif name.endswith("mlp"):
            cfg.intermediate_size = m.gate_proj.out_features
    return model


kwargs = {"gguf_file": args.gguf} if args.gguf else {}
dense = AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32, **kwargs).eval()
tokens = torch.load(args.tokens)
dense_params = n_params(dense)
dense_ppl, windows = perplexity(dense, tokens, args.windows)
dense_speed = speed(dense)
print(f"dense: params {dense_params:,} ppl {dense_ppl:.2f}", flush=True)
machine = (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
           f"torch {torch.__version__}")
import transformers  # noqa: E402

env = f"transformers {transformers.__version__}, torch-pruning {tp.__version__}"
rows = [{"method": "dense (torch-pruning env)", "keep": 1.0, "params": dense_params, "ppl_wikitext2": dense_ppl,
         "eval_windows": windows, "eval_seq_len": 2048, "search_seconds": 0.0, "speed": dense_speed}]
for keep in args.keeps:
    target = math.floor(keep * dense_params)
    t0 = time.perf_counter()
    lo, hi, best = 0.0, 0.95, None
    for _ in range(9):  # bisect the uniform ratio: the smallest ratio whose parameter count meets the budget
        mid = (lo + hi) / 2
        model = torch_pruning(dense, mid)
        if n_params(model) <= target:
            hi, best = mid, (mid, model)
        else:
            lo = mid
    if best is None:
        best = (hi, torch_pruning(dense, hi))
    seconds = time.perf_counter() - t0
    ratio, model = best
    model.eval()
    ppl, _ = perplexity(model, tokens, args.windows)
    sp = speed(model)
    cfg = model.config
    rows.append({
        "method": "torch_pruning", "keep": keep, "params": n_params(model), "ppl_wikitext2": ppl,
        "eval_windows": windows, "eval_seq_len": 2048, "search_seconds": seconds, "speed": sp,
        "prefill_speedup": sp["prefill_tokens_per_s"] / dense_speed["prefill_tokens_per_s"],
        "decode_speedup": sp["decode_tokens_per_s"] / dense_speed["decode_tokens_per_s"],
        "decode_reference": dense_speed["weight_bytes"] / sp["weight_bytes"],
        "structure": f"uniform ratio {ratio:.4f}: hidden {cfg.hidden_size}, {cfg.num_attention_heads} query / "
                     f"{cfg.num_key_value_heads} KV heads, MLP {cfg.intermediate_size}, {cfg.num_hidden_layers} layers",
        "environment": env,
    })
    print(f"torch_pruning keep {keep}: params {rows[-1]['params']:,} ppl {ppl:.2f} ({rows[-1]['structure']}, "
          f"{seconds:.0f} s)", flush=True)

stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
with open(args.out, "w") as f:
    json.dump([{**r, "date": stamp, "machine": machine, "environment": env} for r in rows], f, indent=1)
print(f"wrote {args.out}")
