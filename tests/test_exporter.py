import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from dms_llm.exporter import ExportError, export
from dms_llm.gates import hard_masked
from dms_llm.loading import ModelLoadError, load_model
from dms_llm.structure import ModelShape, Structure

from .conftest import tiny_llama
from .test_resources import random_structure


@pytest.mark.parametrize("seed", range(8))
def test_export_reload_matches_hard_masked_model(tmp_path, seed):
    """Property: random structures (MHA/GQA, layers, attention-only and MLP-only removals) export to a
    checkpoint whose logits equal the hard-masked model's."""
    rng = random.Random(seed)
    model = tiny_llama(num_kv_heads=rng.choice([1, 2, 4]), tie=bool(seed % 2), bias=seed % 4 == 1, seed=seed)
    shape = ModelShape.from_model(model)
    uniform = seed % 3 == 0
    s = random_structure(shape, rng, uniform=uniform)
    result = export(model, s, tmp_path / "out")
    assert result.uniform == s.is_uniform()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=not result.uniform)
    if result.uniform:
        assert type(reloaded) is LlamaForCausalLM
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad(), hard_masked(model, s):
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-4
    info = json.loads((tmp_path / "out" / "dms_structure.json").read_text())
    assert info["params_after"] == result.params
    assert Structure.from_dict(info["structure"]) == s
    assert (tmp_path / "out" / "dms_structure.png").stat().st_size > 1000


def test_uniform_export_is_a_stock_checkpoint_and_decodes_incrementally(tmp_path, gqa_model):
    shape = ModelShape.from_model(gqa_model)
    s = Structure.dense(shape)
    for layer in s.layers:
        layer.kv_heads, layer.channels = [1], layer.channels[::2]
    s.layers[1].kv_heads, s.layers[1].channels = [], []
    export(gqa_model, s, tmp_path / "u")
    files = {p.name for p in (tmp_path / "u").iterdir()}
    assert not any(f.endswith(".py") for f in files)
    config = json.loads((tmp_path / "u" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["intermediate_size"]) == (3, 1, 48)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "u")
    _check_incremental_decoding(model)


def test_per_layer_export_decodes_incrementally_and_needs_trust_remote_code(tmp_path, gqa_model):
    shape = ModelShape.from_model(gqa_model)
    s = Structure.dense(shape)
    s.layers[0].kv_heads = []  # layer 0 without attention: the KV cache must still be indexed right
    s.layers[1].channels = []
    s.layers[2].kv_heads = [1]
    export(gqa_model, s, tmp_path / "p")
    files = {p.name for p in (tmp_path / "p").iterdir()}
    assert {"configuration_dms_llama.py", "modeling_dms_llama.py"} <= files
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p", trust_remote_code=True)
    assert model.model.layers[0].self_attn is None and model.model.layers[1].mlp is None
    _check_incremental_decoding(model)
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(str(tmp_path / "p"))


def _check_incremental_decoding(model):
    ids = torch.randint(0, 128, (1, 12))
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        full = model(input_ids=out).logits[0, 11:-1].argmax(-1)
    assert torch.equal(out[0, 12:], full)


def test_export_refuses_source_folder_and_existing_output(tmp_path, gqa_model):
    s = Structure.dense(ModelShape.from_model(gqa_model))
    src = tmp_path / "src"
    gqa_model.save_pretrained(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(ExportError, match="source folder"):
        export(gqa_model, s, src / "pruned", source_dir=src)
    with pytest.raises(ExportError, match="source folder"):
        export(gqa_model, s, src, source_dir=src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="overwrite=True"):
        export(gqa_model, s, out)
    assert (out / "keep.txt").read_text() == "user data"
    export(gqa_model, s, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_failed_verification_leaves_nothing_behind(tmp_path, gqa_model):
    s = Structure.dense(ModelShape.from_model(gqa_model))
    s.layers[0].kv_heads = [0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(ExportError, match="differs"):
        export(gqa_model, s, out, overwrite=True, atol=-1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "old.txt").read_text() == "previous export"


def test_a_wrong_slice_is_caught_by_the_default_tolerance(gqa_model, monkeypatch):
    """The sliced-vs-masked check (10x the reload check's tolerance, for the rounding a damaged model amplifies)
    still stops a slice that moves one MLP channel's output weights onto its neighbour."""
    import dms_llm.exporter as exporter

    s = Structure.dense(ModelShape.from_model(gqa_model))
    s.layers[1].channels = list(range(0, gqa_model.config.intermediate_size, 2))
    exporter.build_pruned_model(gqa_model, s)  # the right slice passes
    right = exporter._slice_layer

    def shifted(state, layer_structure, shape):
        out = right(state, layer_structure, shape)
        if layer_structure is s.layers[1]:
            out["mlp.down_proj.weight"] = out["mlp.down_proj.weight"].roll(1, dims=1)
        return out

    monkeypatch.setattr(exporter, "_slice_layer", shifted)
    with pytest.raises(ExportError, match="differs"):
        exporter.build_pruned_model(gqa_model, s)
