"""Mistral / Qwen2 / Qwen3: supported with uniform structures (stock config of their own class)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

from dms_llm.exporter import ExportError, export
from dms_llm.gates import hard_masked
from dms_llm.resources import ResourceModel, count_parameters
from dms_llm.search import PruneConfig, prune
from dms_llm.structure import ModelShape, Structure

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, head_dim=16)


@pytest.mark.parametrize("config_cls", [MistralConfig, Qwen2Config, Qwen3Config])
def test_uniform_search_and_export(tmp_path, config_cls, calib):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**COMMON)).eval()
    shape = ModelShape.from_model(model)
    assert ResourceModel(shape).dense() == count_parameters(model)
    result = prune(model, calib, PruneConfig(keep=0.75, steps=3, warmup_steps=1, uniform=True), progress=False)
    assert result.structure.is_uniform() and result.met_budget
    out = export(model, result.structure, tmp_path / "u")
    reloaded = AutoModelForCausalLM.from_pretrained(out.path)
    assert type(reloaded) is type(model) and count_parameters(reloaded) == result.pruned_resource
    ids = calib[:1]
    with torch.no_grad(), hard_masked(model, result.structure):
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max() <= 1e-4


def test_per_layer_export_of_non_llama_is_refused_with_advice(tmp_path):
    model = AutoModelForCausalLM.from_config(Qwen2Config(**COMMON)).eval()
    s = Structure.dense(ModelShape.from_model(model))
    s.layers[0].channels = s.layers[0].channels[:8]
    with pytest.raises(ExportError, match="--uniform"):
        export(model, s, tmp_path / "p")
    assert not (tmp_path / "p").exists()
