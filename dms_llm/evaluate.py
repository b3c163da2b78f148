"""Evaluation of dense and pruned models: perplexity (DESIGN.md §5).

Perplexity = exp(mean token NLL) over non-overlapping windows of ``seq_len`` tokens of the whole tokenized text
(the SparseGPT / Wanda / SliceGPT protocol); each window predicts its tokens 2..seq_len.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .data import evaluation_tokens


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
) -> dict:
    """Perplexity of ``model`` on ``data`` (a dataset name or path; or pre-tokenized ``tokens``).

    Returns ``{"ppl", "nll", "windows", "seq_len", "tokens", "seconds"}``."""
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
    for i in range(0, n, batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll_sum += float(nll)
        count += ids[:, 1:].numel()
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


def evaluate(model, tokenizer, ppl_data=("wikitext2",), seq_len: int | None = None, max_windows: int | None = None) -> dict:
    """Evaluate an in-memory model: ``{"perplexity": {data: result}}`` for every source in ``ppl_data``."""
    return {"perplexity": {str(d): perplexity(model, tokenizer, d, seq_len, max_windows) for d in ppl_data}}
