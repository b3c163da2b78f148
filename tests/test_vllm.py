"""The vLLM plugin (dms_llm.vllm_plugin / dms_llm.vllm_model): per-layer exports of every family it serves, with a
removed attention block, a removed MLP block and a removed layer, give vLLM the greedy tokens and top logprobs of
transformers. The checks of what it refuses run everywhere; the vLLM runs where vLLM is installed
(``scripts/test_vllm.sh`` makes that environment and runs this file)."""

import os

import pytest
import torch

from dms_llm.exporter import build_pruned_model, export
from dms_llm.vllm_plugin import check_servable, check_tensor_parallel, tensor_parallel_sizes

from . import test_families  # the same tiny models and removals as the transformers tests

# the families' tiny models at head size 64: vLLM's CPU attention takes 32, 64, 80, ... (not 16)
VLLM_SIZES = dict(hidden_size=128, intermediate_size=192, head_dim=64)
COMMON = {**test_families.COMMON, **VLLM_SIZES}
SERVED = ("llama3", "mistral", "qwen2", "qwen3")  # mistral: window 8 < prompts; qwen2: biases; qwen3: q/k norms
PROMPTS = [[5, 17, 42, 99, 3, 64, 12, 7, 88, 21, 9, 30], [100, 2, 2, 57, 31, 75, 44, 18, 6, 120, 11, 63, 27, 90]]
NEW_TOKENS = 16


def tiny(family: str):
    return test_families.tiny(family, **VLLM_SIZES)


def per_layer_config(**values):
    from dms_llm.modeling.configuration_dms_llama import DMSLlamaConfig

    return DMSLlamaConfig(**{**COMMON, "layer_num_key_value_heads": [2, 1, 0], "layer_intermediate_sizes":
                             [40, 0, 192], "num_hidden_layers": 3, **values})


def test_tensor_parallel_sizes_are_those_that_split_every_layer():
    config = per_layer_config(layer_num_key_value_heads=[2, 1, 0], layer_intermediate_sizes=[40, 0, 192])
    assert tensor_parallel_sizes(config, limit=8) == [1, 2]  # layer 1: 1 KV head (replicated) and 2 query heads
    config = per_layer_config(layer_num_key_value_heads=[2, 2, 0], layer_intermediate_sizes=[24, 0, 192])
    assert tensor_parallel_sizes(config, limit=8) == [1, 2, 4]  # 2 KV heads and 4 query heads in each attention
    check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match=r"size 8 cannot split .*layers \[0, 1\].* Sizes that work: 1, 2, 4"):
        check_tensor_parallel(config, 8)


def test_gemma3_per_layer_exports_are_refused_with_what_is_missing():
    check_servable(per_layer_config())
    config = per_layer_config(source_model_type="gemma3_text", sandwich_norms=True, norm_unit_offset=True,
                              embed_scale=11.3, hidden_act="gelu_pytorch_tanh")
    with pytest.raises(ValueError, match=r"gemma3_text.*norms after each block.*1 \+ weight.*scaled token embedding"
                                         r".*gelu_pytorch_tanh.*--format uniform"):
        check_servable(config)


def test_the_plugin_is_an_installed_vllm_entry_point():
    from importlib.metadata import entry_points

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("dms_llm") == "dms_llm.vllm_plugin:register"


def _transformers_greedy(model, prompt):
    """Greedy tokens and, at each step, the log-probability of the chosen token."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


@pytest.fixture(scope="module")
def vllm():
    vllm = pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a quarter of the machine
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawned pytest
    return vllm


@pytest.mark.parametrize("family,repaired", [(f, False) for f in SERVED] + [("llama3", True)])
def test_vllm_runs_the_per_layer_export_like_transformers(vllm, tmp_path, family, repaired):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = tiny(family)
    structure = test_families.removals(model)
    pruned = None
    if repaired:  # the repair's biases on o_proj / down_proj
        pruned = build_pruned_model(model, structure, output_bias=True)
        with torch.no_grad():
            for name, p in pruned.named_parameters():
                if name.endswith(("o_proj.bias", "down_proj.bias")):
                    p.normal_(0, 0.5)
    exported = export(model, structure, tmp_path / "export", pruned=pruned).model.eval()
    assert type(exported).__name__ == "DMSLlamaForCausalLM"
    expected = [_transformers_greedy(exported, p) for p in PROMPTS]

    llm = LLM(str(tmp_path / "export"), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=128, seed=0)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                            SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=1, detokenize=False))
    finally:
        del llm
    for out, (tokens, logprobs) in zip(outs, expected):
        got = out.outputs[0]
        assert list(got.token_ids) == tokens
        got_logprobs = [step[t].logprob for step, t in zip(got.logprobs, got.token_ids)]
        assert max(abs(a - b) for a, b in zip(got_logprobs, logprobs)) < 1e-3
