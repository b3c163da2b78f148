"""Every supported family (Llama 3, Mistral, Qwen2, Qwen3, Gemma 3) per layer and uniform, on tiny random configs."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from dms_llm.exporter import ExportError, check_per_layer_support, export
from dms_llm.gates import hard_masked
from dms_llm.resources import ResourceModel, count_parameters
from dms_llm.search import PruneConfig, prune
from dms_llm.structure import ModelShape, Structure

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, head_dim=16, tie_word_embeddings=False)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
FAMILIES = {
    "llama3": lambda: LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8),  # shorter than the test sequences
    "qwen2": lambda: Qwen2Config(**{**COMMON, "num_key_value_heads": 4, "tie_word_embeddings": True}),  # MHA, biases
    "qwen3": lambda: Qwen3Config(**COMMON),
    # Qwen2 with windows on its upper layers (max_window_layers): layers of both kinds in one model
    "qwen2_windows": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=2),
    # Gemma 3: 5:1 sliding / global layers with a rotary embedding each, sandwich norms, scaled embeddings,
    # query_pre_attn_scalar (unlike head_dim here), a final softcap (Gemma 2's, kept as an option by Gemma 3)
    "gemma3": lambda: Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 6, "tie_word_embeddings": True},
                                       sliding_window=8, query_pre_attn_scalar=32, final_logit_softcapping=5.0),
}


def tiny(family: str, seed: int = 0, **config_values):
    """A tiny random model of ``family`` (FAMILIES), with ``config_values`` set on its config first."""
    config = FAMILIES[family]()
    for key, value in config_values.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # spread norms and biases so that every feature changes the logits
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's norms scale by 1 + weight
                p.uniform_(-0.5, 0.5) if family == "gemma3" else p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def removals(model) -> Structure:
    """Narrowed heads and channels, layer 0's attention removed, an MLP removed, a whole layer removed."""
    s = Structure.dense(ModelShape.from_model(model))
    s.layers[0].kv_heads = []
    s.layers[0].channels = s.layers[0].channels[:40]
    s.layers[1].kv_heads = s.layers[1].kv_heads[1:]
    s.layers[1].channels = []
    s.layers[2].kv_heads, s.layers[2].channels = [], []
    return s


def masked_logits(model, structure, ids):
    with torch.no_grad(), hard_masked(model, structure):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.filterwarnings("error::FutureWarning")  # a deprecated transformers call in the exported code fails here
def test_per_layer_export_matches_masked_model_and_decodes(tmp_path, family):
    model = tiny(family)
    s = removals(model)
    out = export(model, s, tmp_path / "p")
    assert not out.uniform
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["model_type"] == "dms_llama" and config["source_model_type"] == model.config.model_type
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p", trust_remote_code=True)
    assert count_parameters(reloaded) == ResourceModel(ModelShape.from_model(model)).of_structure(s) == out.params
    ids = torch.randint(0, 128, (2, 24))  # longer than Mistral's window of 8
    assert (reloaded(input_ids=ids).logits - masked_logits(model, s, ids)).abs().max() <= 1e-4
    prompt = ids[:1, :12]  # incremental decoding (KV cache, past the window) equals a full forward
    generated = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        full = reloaded(input_ids=generated).logits[0, 11:-1].argmax(-1)
        assert torch.equal(generated[0, 12:], full)
        # token by token with the cache and no position ids: the cache itself must know how many tokens it holds
        # (layer 0 has no attention here), and a left-padded batch decodes as its rows do alone
        out = reloaded(input_ids=ids[:, :10], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        steps = [out.logits] + [reloaded(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits
                                for t in range(10, 24)]
        assert (torch.cat(steps, 1) - reloaded(input_ids=ids).logits).abs().max() <= 1e-4
        mask = torch.ones_like(ids)
        mask[1, :6] = 0
        padded = reloaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone = reloaded.generate(input_ids=ids[1:, 6:], max_new_tokens=6, do_sample=False)
    assert torch.equal(padded[1, 24:], alone[0, 18:])


def test_features_are_carried_and_matter(tmp_path):
    """Every family feature of the per-layer config is used: changing one changes the logits."""
    ids = torch.randint(0, 128, (1, 24))
    one_rope = {"rope_type": "default", "rope_theta": 1e6}
    for family, key, value in [("mistral", "sliding_window", 64), ("qwen3", "qk_norm", False),
                               ("qwen2", "qkv_bias", False),
                               ("llama3", "rope_parameters", {"rope_type": "default", "rope_theta": 500000.0}),
                               ("qwen2_windows", "layer_types", ["full_attention"] * 3),
                               ("gemma3", "layer_types", ["sliding_attention"] * 5),
                               ("gemma3", "rope_parameters", dict.fromkeys(("sliding_attention", "full_attention"),
                                                                           one_rope)),
                               ("gemma3", "norm_unit_offset", False), ("gemma3", "embed_scale", None),
                               ("gemma3", "query_pre_attn_scalar", None), ("gemma3", "final_logit_softcapping", None)]:
        model = tiny(family)
        s = removals(model)
        folder = export(model, s, tmp_path / f"{family}-{key}").path
        good = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)(input_ids=ids).logits
        config = json.loads((folder / "config.json").read_text())
        assert config[key] != value, (family, key)
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        bad = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)(input_ids=ids).logits
        assert (bad - good).abs().max() > 1e-3, (family, key)


def test_per_layer_export_loads_without_dms_llm(tmp_path):
    """A copy of each family's folder loads where dms-llm is not installed (only transformers), with the same
    logits and the same greedy continuation."""
    ids = torch.randint(0, 128, (1, 16))
    for family in FAMILIES:
        model = tiny(family)
        s = removals(model)
        shutil.copytree(export(model, s, tmp_path / family).path, tmp_path / "elsewhere" / family)
        torch.save(masked_logits(model, s, ids), tmp_path / f"{family}.pt")
    code = f"""
import sys, torch
sys.modules['dms_llm'] = None  # importing dms_llm fails here
from transformers import AutoModelForCausalLM
ids = torch.tensor({ids.tolist()})
for family in {list(FAMILIES)}:
    m = AutoModelForCausalLM.from_pretrained(family, trust_remote_code=True)
    assert (m(input_ids=ids).logits - torch.load({str(tmp_path)!r} + f'/{{family}}.pt')).abs().max() <= 1e-4, family
    out = m.generate(ids[:, :8], max_new_tokens=8, do_sample=False)
    assert torch.equal(out[0, 8:], m(input_ids=out).logits[0, 7:-1].argmax(-1)), family
print('ok')
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path / "elsewhere")
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("uniform", [False, True])
def test_search_meets_budget_and_exports(tmp_path, family, uniform, calib):
    model = tiny(family)
    shape = ModelShape.from_model(model)
    assert ResourceModel(shape).dense() == count_parameters(model)
    result = prune(model, calib, PruneConfig(keep=0.75, steps=4, warmup_steps=1, uniform=uniform), progress=False)
    assert result.met_budget
    assert result.structure.is_uniform() or not uniform
    out = export(model, result.structure, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out.path, trust_remote_code=not out.uniform)
    if out.uniform:
        assert type(reloaded) is type(model)
    assert count_parameters(reloaded) == result.pruned_resource
    ids = calib[:1]
    assert (reloaded(input_ids=ids).logits - masked_logits(model, result.structure, ids)).abs().max() <= 1e-4


def test_per_layer_check_passes_every_family_and_refuses_a_bidirectional_gemma():
    for family in FAMILIES:
        check_per_layer_support(tiny(family))
    config = FAMILIES["gemma3"]()
    config.use_bidirectional_attention = True  # EmbeddingGemma-style: not a causal LM
    with pytest.raises(ExportError, match="both directions.*--format uniform"):
        check_per_layer_support(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_lowers_block_errors_and_the_repaired_export_reloads(tmp_path, family):
    from dms_llm.exporter import build_pruned_model
    from dms_llm.reconstruct import ReconstructConfig, reconstruct

    model = tiny(family)
    s = Structure.dense(ModelShape.from_model(model))  # narrower blocks everywhere, one removed
    s.layers[0].channels = s.layers[0].channels[:48]
    s.layers[1].kv_heads = s.layers[1].kv_heads[:1]
    s.layers[2].channels = []
    s.layers[3].channels = s.layers[3].channels[::3]
    windows = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(3))
    pruned = build_pruned_model(model, s, output_bias=True)

    before = kl_gap(pruned, model, windows)
    report = reconstruct(pruned, model, s, windows, ReconstructConfig(samples=None), progress=False)
    assert all(r["error_after"] < r["error_before"] for r in report["blocks"] if r["error_before"] > 1e-9)
    assert kl_gap(pruned, model, windows) < before
    out = export(model, s, tmp_path / "r", pruned=pruned)
    reloaded = AutoModelForCausalLM.from_pretrained(out.path, trust_remote_code=True)
    with torch.no_grad():
        assert (reloaded(input_ids=windows[:2]).logits - pruned(input_ids=windows[:2]).logits).abs().max() <= 1e-4
    assert count_parameters(reloaded) == out.params


@pytest.mark.parametrize("family", FAMILIES)
def test_block_by_block_runner_reproduces_the_model(family):
    """The reconstruction's (and the layer-wise peers') block-by-block forward computes the model's own loss, the
    attention window included (sequences longer than Mistral's)."""
    model = tiny(family)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    assert abs(runner_loss(model, ids) - model(input_ids=ids, labels=ids).loss.item()) <= 1e-4


@torch.no_grad()
def runner_loss(model, ids) -> float:
    """The mean next-token loss of ``model`` on ``ids``, computed block by block by the LayerRunner."""
    from dms_llm.layerwise import LayerRunner

    run = LayerRunner(model, ids, batch_size=len(ids))
    (hidden,) = run.embed()
    for layer in run.layers:
        hidden = run.layer(layer, hidden)
    nll, count = run.nll(hidden, ids)
    return nll / count


@torch.no_grad()
def kl_gap(student, teacher, ids) -> float:
    from dms_llm.training import kl_divergence

    return kl_divergence(student(input_ids=ids).logits, teacher(input_ids=ids).logits).item()


# Gemma 3 text models: what is particular to them


def tiny_gemma(seed: int = 0):
    model = tiny("gemma3", seed)
    assert model.config.layer_types.count("sliding_attention") == 5  # Gemma's 5:1 pattern, window shorter than tests
    return model


def test_gemma3_uniform_search_exports_a_stock_checkpoint_that_decodes(tmp_path, calib):
    model = tiny_gemma()
    shape = ModelShape.from_model(model)
    assert shape.sandwich_norms and ResourceModel(shape).dense() == count_parameters(model)
    result = prune(model, calib, PruneConfig(keep=0.7, steps=4, warmup_steps=1, uniform=True), progress=False)
    assert result.met_budget and result.structure.is_uniform()
    s = Structure.dense(shape)  # also a fixed structure that removes a sliding and the global layer
    for layer in s.layers:
        layer.kv_heads, layer.channels = layer.kv_heads[:1], layer.channels[:48]
    s.layers[1].kv_heads = s.layers[1].channels = s.layers[5].kv_heads = s.layers[5].channels = []
    for structure, name in ((result.structure, "searched"), (s, "fixed")):
        out = export(model, structure, tmp_path / name)
        reloaded = AutoModelForCausalLM.from_pretrained(out.path)
        assert type(reloaded) is type(model) and count_parameters(reloaded) == out.params
        ids = torch.randint(0, 128, (2, 24))
        assert (reloaded(input_ids=ids).logits - masked_logits(model, structure, ids)).abs().max() <= 1e-4
    assert reloaded.config.layer_types == ["sliding_attention"] * 4
    generated = reloaded.generate(ids[:1, :12], max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        assert torch.equal(generated[0, 12:], reloaded(input_ids=generated).logits[0, 11:-1].argmax(-1))


def test_gemma3_gates_act_after_the_block_norms_and_the_runner_reproduces_the_model():
    """A depth gate before Gemma's post-block RMSNorm would be undone by it: half a gate must halve the block."""
    from dms_llm.gates import MaskHooks

    model = tiny_gemma()
    shape = ModelShape.from_model(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    hooks = MaskHooks(model, shape)
    outputs = []  # what layer 0's attention block adds to the stream, as gated
    seen = model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda m, a, out: outputs.append(out))
    for value in (0.0, 0.5, 1.0):
        hooks.masks = {"attn_depth": torch.tensor([value] + [1.0] * 5)}
        with torch.no_grad():
            model(input_ids=ids)
    hooks.remove()
    seen.remove()
    assert outputs[0].abs().max() == 0 and outputs[2].abs().max() > 1e-2
    assert torch.allclose(outputs[1], outputs[2] / 2, atol=1e-5)  # half the gate, half the block
    with torch.no_grad():
        assert abs(runner_loss(model, ids) - model(input_ids=ids, labels=ids).loss.item()) <= 1e-4


def test_gemma3_reconstruction_lowers_block_errors_without_take_over():
    from dms_llm.exporter import build_pruned_model
    from dms_llm.reconstruct import ReconstructConfig, reconstruct

    model = tiny_gemma()
    s = Structure.dense(ModelShape.from_model(model))
    for layer in s.layers:
        layer.kv_heads, layer.channels = layer.kv_heads[:1], layer.channels[::2]
    s.layers[2].kv_heads = s.layers[2].channels = []
    windows = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(3))
    pruned = build_pruned_model(model, s)

    before = kl_gap(pruned, model, windows)
    report = reconstruct(pruned, model, s, windows, ReconstructConfig(samples=None), progress=False)
    assert len(report["blocks"]) == 10 and not any(r["absorbs"] for r in report["blocks"])
    assert all(r["error_after"] < r["error_before"] for r in report["blocks"] if r["error_before"] > 1e-9)
    assert kl_gap(pruned, model, windows) < before


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma3"])
def test_finetune_and_eval_take_every_family_per_layer(family):
    """Recovery (LoRA, merged) closes the gap to the dense teacher on a per-layer Mistral / Qwen / Gemma export and
    keeps its shapes; perplexity evaluation runs on it."""
    import dms_llm
    from dms_llm.exporter import build_pruned_model
    from dms_llm.recovery import FinetuneConfig, finetune

    dense = tiny(family)
    pruned = build_pruned_model(dense, removals(dense))
    windows = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))

    before, shapes = kl_gap(pruned, dense, windows), {k: v.shape for k, v in pruned.state_dict().items()}
    finetune(pruned, windows, FinetuneConfig(tokens=20 * 4 * 32, lora=True, lr=5e-3), teacher=dense, progress=False)
    assert kl_gap(pruned, dense, windows) < 0.7 * before
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes
    ppl = dms_llm.perplexity(pruned, tokens=windows.flatten(), seq_len=32, max_windows=4, progress=False)["ppl"]
    assert 1 < ppl < 1e4


@pytest.mark.parametrize("family", ["gemma3", "qwen2_windows"])
def test_prune_command_per_layer_on_a_gemma3_and_a_mixed_window_folder(tmp_path, text_file, family):
    """`dms-llm prune FOLDER --format per-layer` as a user runs it, on the two layouts the per-layer format gained
    last (under `auto` either format may win on a tiny random model): the search, the repair and both perplexities
    run, the export reloads at the recorded size, and its card says how to load it."""
    from .conftest import char_tokenizer

    dense = tmp_path / "dense"
    tiny(family).save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dms_llm", "prune", str(dense), "--keep", "0.8", "--steps", "3",
                           "--format", "per-layer", "--seq-len", "32", "--num-samples", "8", "--calib", str(text_file),
                           "--eval-data", str(text_file), "--eval-windows", "2", "--eval-seq-len", "32",
                           "--repair-check", "2", "--repair-check-len", "64", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "dms_structure.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert info["format"].startswith("per-layer") and config["source_model_type"] == tiny(family).config.model_type
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert count_parameters(reloaded) == info["params_after"] <= 0.8 * info["params_before"] + 1
    assert info["reconstruction"]["blocks_refit"] > 0
    assert all(1 < info["perplexity"][m]["ppl"] < 1e3 for m in ("dense", "pruned"))
    assert "trust_remote_code=True" in (out / "README.md").read_text()
