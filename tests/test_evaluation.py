import math

import torch

from dms_llm.evaluation import perplexity, speed, speed_ratios
from dms_llm.exporter import build_pruned_model
from dms_llm.structure import ModelShape, Structure


def test_perplexity_is_exp_of_mean_nll(gqa_model):
    tokens = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    r = perplexity(gqa_model, tokens=tokens, seq_len=32)
    assert r["windows"] == 3 and r["tokens"] == 3 * 31
    ids = tokens[:96].view(3, 32)
    with torch.no_grad():
        logits = gqa_model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert math.isclose(r["ppl"], math.exp(nll.item()), rel_tol=1e-5)
    assert perplexity(gqa_model, tokens=tokens, seq_len=32, max_windows=1)["windows"] == 1


def test_speed_reports_throughput_and_bytes(gqa_model):
    s = Structure.dense(ModelShape.from_model(gqa_model))
    for layer in s.layers[1:]:
        layer.kv_heads, layer.channels = [], []
    pruned = build_pruned_model(gqa_model, s)
    d = speed(gqa_model, prompt_len=16, new_tokens=4, repeats=1)
    p = speed(pruned, prompt_len=16, new_tokens=4, repeats=1)
    assert d["prefill_tokens_per_s"] > 0 and d["decode_tokens_per_s"] > 0
    assert p["weight_bytes"] < d["weight_bytes"]
    r = speed_ratios(d, p)
    assert r["decode_reference"] > 1 and r["decode_speedup"] > 0
