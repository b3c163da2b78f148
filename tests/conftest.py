import atexit
import os
import shutil
import tempfile

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(2)
# converted GGUF models go to a cache of this test session (inherited by subprocesses), not the user's
if "DMS_LLM_CACHE" not in os.environ:
    os.environ["DMS_LLM_CACHE"] = tempfile.mkdtemp(prefix="dms-llm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DMS_LLM_CACHE"], ignore_errors=True)


def tiny_llama(num_kv_heads=2, num_heads=4, layers=4, tie=True, hidden=64, intermediate=96, bias=False, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, head_dim=hidden // num_heads,
    )
    model = LlamaForCausalLM(config).eval()
    # random init gives tiny norms/weights; spread them so masking has visible effects
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def gqa_model():
    return tiny_llama()


@pytest.fixture
def mha_model():
    return tiny_llama(num_kv_heads=4, tie=False, bias=True)


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (8, 32), generator=g)


def char_tokenizer():
    """A 128-token character-level tokenizer (ASCII), so tiny models can go through the command line."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={chr(i): i for i in range(128)}, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="\x02", eos_token="\x03", pad_token="\x00")


TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times." for i in range(400))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def dense_folder(tmp_path):
    """A tiny random GQA Llama saved with a tokenizer, as a user's local checkpoint."""
    folder = tmp_path / "dense"
    tiny_llama().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def per_layer_structure(model):
    from dms_llm.structure import ModelShape, Structure

    s = Structure.dense(ModelShape.from_model(model))
    s.layers[0].channels = s.layers[0].channels[:48]
    s.layers[1].kv_heads = [1]
    s.layers[2].kv_heads = []
    s.layers[3].channels = []
    return s


@pytest.fixture
def pruned_folder(tmp_path, dense_folder):
    """A per-layer dms-llm export of ``dense_folder`` (base model recorded as a Hub-style id)."""
    from dms_llm.exporter import export

    model = LlamaForCausalLM.from_pretrained(dense_folder)
    out = tmp_path / "pruned"
    export(model, per_layer_structure(model), out, tokenizer=char_tokenizer(), source_dir=dense_folder,
           metadata={"base_model": "example-org/tiny-llama", "command": "dms-llm prune example-org/tiny-llama",
                     "search": {"calibration": "wikitext2"}})
    return out


def nan_on_call(fn, n: int):
    """``fn`` whose ``n``-th call returns its value (or the first of the values it returns) times NaN (a loss that
    turns non-finite at one step)."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        value = fn(*args, **kwargs)
        if calls["n"] != n:
            return value
        return (value[0] * float("nan"), *value[1:]) if isinstance(value, tuple) else value * float("nan")

    return wrapped
