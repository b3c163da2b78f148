"""Evaluation of dense and pruned models: perplexity, zero-shot accuracy, speed (docs/DESIGN.md §5).

Perplexity = exp(mean token NLL) over non-overlapping windows of ``seq_len`` tokens of the whole tokenized text
(the SparseGPT / Wanda / SliceGPT protocol); each window predicts its tokens 2..seq_len.
"""

from __future__ import annotations

import math
import time

import torch

from .data import evaluation_tokens
from .logits import OutputHead, final_hidden, next_token_loss
from .progress import Heartbeat


def default_eval_seq_len(model) -> int:
    """2048, or the model's maximum context if smaller."""
    return min(2048, int(getattr(model.config, "max_position_embeddings", 2048) or 2048))


@torch.no_grad()
def perplexity(
    model,
    tokenizer=None,
    data="wikitext2",
    seq_len: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    tokens: torch.Tensor | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``data`` (a dataset name or path; or pre-tokenized ``tokens``). ``progress``: a bar
    over the windows with an estimate of the time left, on a terminal.

    Returns ``{"ppl", "nll", "windows", "seq_len", "tokens", "seconds"}``."""
    from tqdm.auto import tqdm

    seq_len = seq_len or default_eval_seq_len(model)
    if tokens is None:
        tokens = evaluation_tokens(tokenizer, data)
    total_windows = len(tokens) // seq_len
    if total_windows < 1:
        raise ValueError(f"evaluation data has {len(tokens)} tokens, fewer than one window of {seq_len}")
    n = total_windows if max_windows is None else min(max_windows, total_windows)
    windows = tokens[: n * seq_len].view(n, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count, t0 = 0.0, 0, time.perf_counter()
    head = OutputHead(model)
    beat = Heartbeat("perplexity, windows", n)
    for i in tqdm(range(0, n, batch_size), desc="perplexity", unit="window", unit_scale=batch_size,
                  disable=None if progress else True, dynamic_ncols=True, leave=False):
        ids = windows[i : i + batch_size].to(device)
        lm = next_token_loss(final_hidden(model, ids), head, ids, lm_weight=1.0)[0]  # a few positions at a time
        nll_sum += float(lm) * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
        beat.tick(min(i + batch_size, n))
    model.train(was_training)
    mean = nll_sum / count
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "windows": n,
        "total_windows": total_windows,
        "seq_len": seq_len,
        "tokens": count,
        "seconds": time.perf_counter() - t0,
    }


def evaluate(model, tokenizer, ppl_data=("wikitext2",), seq_len: int | None = None, max_windows: int | None = None,
             tasks=None, include_path=None, limit: int | None = None, batch_size: int | str = 8,
             measure_speed: bool = False, zeroshot_data=None, task_manager=None, request_cache=None) -> dict:
    """Evaluate an in-memory model: perplexity on every source in ``ppl_data`` (``{source: result}``), zero-shot
    accuracy on lm-eval ``tasks`` (local YAML tasks from ``include_path``; the stock tasks on local data from
    ``zeroshot_data``; ``batch_size`` requests at a time, "auto" on a GPU; answers kept in ``request_cache`` so an
    interrupted run resumes), and prefill/decode speed if ``measure_speed``."""
    results: dict = {"perplexity": {str(d): perplexity(model, tokenizer, d, seq_len, max_windows)
                                    for d in ppl_data or ()}}
    if tasks:
        from .zeroshot import zero_shot

        results["zero_shot"] = zero_shot(model, tokenizer, tasks, include_path=include_path, batch_size=batch_size,
                                         limit=limit, data_dir=zeroshot_data, manager=task_manager,
                                         cache=request_cache)
    if measure_speed:
        results["speed"] = speed(model)
    return results


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def speed(model, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3,
          seed: int = 0) -> dict:
    """Prefill and decode throughput of ``model`` at a stated batch and length, plus memory.

    Prefill: one forward over ``batch_size x prompt_len`` tokens. Decode: ``new_tokens`` greedy steps of one token
    with the KV cache after that prefill. The best of ``repeats`` runs is reported (after one warm-up run).
    Returns tokens/s for both, the weight bytes and, on CUDA, the peak allocated memory."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best_prefill, best_decode = float("inf"), float("inf")
    for run in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, cache=cache, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        if run > 0:  # run 0 warms up kernels and allocators
            best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
    model.train(was_training)
    weight_bytes = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    return {
        "device": str(device),
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch_size * prompt_len / best_prefill,
        "decode_tokens_per_s": batch_size * new_tokens / best_decode,
        "weight_bytes": weight_bytes,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def speed_ratios(dense: dict, pruned: dict) -> dict:
    """Speedups of a pruned model over its dense model, and the decode reference dense bytes / pruned bytes."""
    reference = dense["weight_bytes"] / pruned["weight_bytes"]
    decode = pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    return {
        "prefill_speedup": pruned["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
        "decode_speedup": decode,
        "decode_reference": reference,
        "decode_speedup_vs_reference": decode / reference,
    }
