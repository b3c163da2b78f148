"""Losses over the vocabulary a few positions at a time, and the teacher computed once (dms_llm/logits.py)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import dms_llm.logits as logits_mod
from dms_llm.errors import DMSError
from dms_llm.gates import hard_masked
from dms_llm.logits import HiddenTargets, OutputHead, TeacherCache, final_hidden, next_token_loss
from dms_llm.search import PruneConfig, calibration_losses, prune
from dms_llm.structure import ModelShape, Structure
from dms_llm.training import kl_divergence, lm_loss

from .test_families import FAMILIES, tiny

VOCAB = 4096


def big_vocab_llama(seed=0, tie=True):
    """A tiny Llama whose vocabulary dwarfs it (the case the chunking is for)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie,
                         max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked next-token distributions, as trained models have (the KLs are then not tiny)
        model.lm_head.weight.mul_(30)
    return model


def close(got, expected, tol=1e-5):
    """Equal up to float rounding: the largest difference within ``tol`` of the largest value."""
    return (got - expected).abs().max() <= tol * expected.abs().max() + 1e-9


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 positions (several per window, the last one short)."""
    monkeypatch.setattr(logits_mod, "CHUNK_ELEMENTS", 5 * VOCAB)


def coarse_kl(student, teacher, k):
    """KL between the two distributions coarsened to the teacher's top k tokens plus one bin for the rest, from
    full logits in float64 (the reference the top-k form must equal)."""
    s, t = F.log_softmax(student.double(), -1), F.log_softmax(teacher.double(), -1)
    idx = t.topk(k, -1).indices
    ts, ss = t.gather(-1, idx), s.gather(-1, idx)
    kl = (ts.exp() * (ts - ss)).sum(-1)
    if k < t.shape[-1]:
        t_rest, s_rest = torch.log1p(-ts.exp().sum(-1)), torch.log1p(-ss.exp().sum(-1))
        kl = kl + t_rest.exp() * (t_rest - s_rest)
    return kl.mean()


def test_final_hidden_through_the_head_gives_the_models_logits_in_every_family():
    for family in FAMILIES:  # Gemma 3 with its final softcap
        model = tiny(family)
        ids = torch.randint(0, 128, (2, 12))
        with torch.no_grad():
            assert torch.allclose(OutputHead(model)(final_hidden(model, ids)), model(input_ids=ids).logits.float(),
                                  atol=1e-5), family


def test_final_hidden_skips_the_heads_product_and_restores_the_head():
    model = big_vocab_llama()
    ids = torch.randint(0, VOCAB, (2, 12))
    widths = []
    model.lm_head.register_forward_hook(lambda module, args, out: widths.append(out.shape[-1]))
    calls = []

    def wrapped(hidden):  # an instance forward already there (accelerate's hooks set one): it must come back
        calls.append(1)
        return type(model.lm_head).forward(model.lm_head, hidden)

    model.lm_head.forward = wrapped
    with torch.no_grad():
        hidden = final_hidden(model, ids)
        assert torch.equal(hidden, model.model(input_ids=ids).last_hidden_state)
        assert widths == [0] and not calls  # the head's hooks ran, its product did not
        assert model.lm_head.forward is wrapped
        assert model(input_ids=ids).logits.shape == (2, 12, VOCAB) and calls == [1]
    del model.lm_head.forward
    final_hidden(model, ids)
    assert "forward" not in model.lm_head.__dict__


@pytest.mark.parametrize("family", ["big-vocab llama", "gemma3"])  # Gemma 3 with a final softcap
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(monkeypatch, family):
    if family == "gemma3":
        dense, student = tiny("gemma3", 0), tiny("gemma3", 1)
    else:
        dense, student = big_vocab_llama(0), big_vocab_llama(1, tie=False)
    monkeypatch.setattr(logits_mod, "CHUNK_ELEMENTS", 5 * dense.config.vocab_size)  # chunks of 5 positions
    student.requires_grad_(True)  # gradients to the head's weights as well (recovery of all weights)
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        teacher_hidden = final_hidden(dense, ids)
        teacher_logits = dense(input_ids=ids).logits

    for kl_weight, lm_weight, teacher in ((1.0, 0.5, True), (0.0, 1.0, False)):
        logits = student(input_ids=ids).logits
        full = kl_weight * kl_divergence(logits, teacher_logits) + lm_weight * lm_loss(logits, ids)
        expected = torch.autograd.grad(full, list(student.parameters()))
        targets = HiddenTargets(teacher_hidden.reshape(26, -1), OutputHead(dense)) if teacher else None
        loss, parts = next_token_loss(final_hidden(student, ids), OutputHead(student), ids, targets, kl_weight,
                                      lm_weight)
        got = torch.autograd.grad(loss, list(student.parameters()))
        assert loss.item() == pytest.approx(full.item(), rel=1e-5)
        assert kl_weight * parts["kl"].item() + lm_weight * parts["lm"].item() == pytest.approx(full.item(), rel=1e-5)
        for (name, _), g, e in zip(student.named_parameters(), got, expected):
            assert close(g, e), name


def test_the_head_never_sees_more_than_a_chunk_of_positions(small_chunks, monkeypatch):
    model = big_vocab_llama()
    seen, real = [], OutputHead.__call__
    monkeypatch.setattr(OutputHead, "__call__", lambda self, h: seen.append(len(h)) or real(self, h))
    ids = torch.randint(0, VOCAB, (2, 13))
    loss, _ = next_token_loss(final_hidden(model, ids), OutputHead(model), ids, lm_weight=1.0)
    assert max(seen) == 5 and sum(seen) == 26  # 26 positions in chunks of 5
    with torch.no_grad():
        assert loss.item() == pytest.approx(lm_loss(model(input_ids=ids).logits, ids).item(), rel=1e-5)


@pytest.mark.parametrize("k", [16, VOCAB])
def test_top_k_teacher_is_the_coarsened_kl_and_exact_with_the_whole_vocabulary(small_chunks, k):
    dense, student = big_vocab_llama(0), big_vocab_llama(1)
    windows = torch.randint(0, VOCAB, (3, 11))
    cache = TeacherCache(windows, top_k=k)
    cache.fill(dense, [2, 0])
    assert sorted(cache.entries) == [0, 2]
    ids = windows[[2, 0]]
    with torch.no_grad():  # the teacher's logits as the cache made them, window by window (near-ties stay put)
        teacher = torch.cat([OutputHead(dense)(final_hidden(dense, ids[i:i + 1])) for i in range(2)])
        student_logits = student(input_ids=ids).logits
    hidden = final_hidden(student, ids).detach().requires_grad_(True)
    loss, _ = next_token_loss(hidden, OutputHead(student), ids, cache.targets([2, 0], "cpu"))
    (got,) = torch.autograd.grad(loss, hidden)
    logits = student_logits.clone().requires_grad_(True)
    reference = coarse_kl(logits, teacher, k)
    (via_logits,) = torch.autograd.grad(reference, logits)
    expected = via_logits.float() @ student.lm_head.weight  # d/d hidden = d/d logits x W
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)
    assert close(got, expected, 1e-4)  # fp32 against the float64 reference, on peaked distributions
    exact = kl_divergence(student_logits, teacher).item()
    if k == VOCAB:
        assert loss.item() == pytest.approx(exact, rel=1e-5)
    else:  # the bound the top-k form keeps: never above the exact KL
        assert 0 < loss.item() <= exact * (1 + 1e-6)


def test_teacher_entries_do_not_depend_on_their_batch():
    dense = big_vocab_llama()
    windows = torch.randint(0, VOCAB, (4, 9))
    together, alone = TeacherCache(windows, top_k=8), TeacherCache(windows, top_k=8)
    together.fill(dense, [0, 1, 2, 3])
    for r in (3, 1, 0, 2):
        alone.fill(dense, [r])
    for r in range(4):
        assert all(torch.equal(a, b) for a, b in zip(together.entries[r], alone.entries[r]))
    assert together.entries[0][0].dtype == torch.int32 and together.entries[0][0].shape == (9, 8)


def test_exact_teacher_cache_scores_like_the_full_logits(small_chunks):
    dense = big_vocab_llama()
    windows = torch.randint(0, VOCAB, (4, 16))
    shape = ModelShape.from_model(dense)
    pruned = Structure.dense(shape)
    pruned.layers[0].channels = pruned.layers[0].channels[:20]
    pruned.layers[1].kv_heads = pruned.layers[1].kv_heads[:1]
    [ours], _ = calibration_losses(dense, [pruned], windows, lm_weight=1.0, teacher=TeacherCache(windows, top_k=0))
    with torch.no_grad():
        teacher = dense(input_ids=windows).logits
        with hard_masked(dense, pruned):
            student = dense(input_ids=windows).logits
    expected = sum(kl_divergence(student[i:i + 1], teacher[i:i + 1]) + lm_loss(student[i:i + 1], windows[i:i + 1])
                   for i in range(4)) / 4
    assert ours == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("top_k", [0, 8])
def test_search_with_either_teacher_form_meets_the_budget_and_leaves_the_model_alone(top_k):
    model = big_vocab_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, VOCAB, (6, 16))
    result = prune(model, windows, PruneConfig(keep=0.995, steps=4, warmup_steps=1, teacher_top_k=top_k),
                   progress=False)
    assert result.met_budget and result.steps_run == 4
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_teacher_settings_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        TeacherCache(torch.zeros(1, 4, dtype=torch.long), top_k=-1)
    with pytest.raises(DMSError, match="teacher_top_k"):
        PruneConfig(keep=0.8, teacher_top_k=-3)


def test_under_autocast_the_frozen_head_is_cast_once_and_the_loss_follows_fp32(small_chunks):
    """bf16 autocast (the search's default on CPUs with native bf16): the frozen head's bf16 copy is made once and
    reused while the weight is unchanged, freed by drop_casts; loss and gradient stay near the fp32 ones."""
    model = big_vocab_llama()
    model.requires_grad_(False)
    ids = torch.randint(0, VOCAB, (2, 12))
    teacher = TeacherCache(ids, top_k=16)
    teacher.fill(model, [0, 1])
    results = {}
    for enabled in (False, True):
        hidden = final_hidden(model, ids).detach().requires_grad_(True)
        head = OutputHead(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss, _ = next_token_loss(hidden, head, ids, teacher.targets([0, 1], "cpu"), 1.0, 1.0)
            if enabled:
                first = head.matmul_weight()
                assert first.dtype == torch.bfloat16 and OutputHead(model).matmul_weight() is first
        loss.backward()
        results[enabled] = (loss.detach(), hidden.grad)
    (loss32, grad32), (loss16, grad16) = results[False], results[True]
    assert abs(loss16 - loss32) <= 0.02 * loss32
    assert F.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.99
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)  # a change of the weight: the copy is made again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert OutputHead(model).matmul_weight() is not first
    logits_mod.drop_casts(model)
    assert not hasattr(model.lm_head.weight, "_dms_cast")
