import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dms_llm.loading import ModelLoadError, load_model
from dms_llm.structure import UnsupportedModelError


def test_local_folder_roundtrip(tmp_path, gqa_model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)} | {"[UNK]": 127}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2").save_pretrained(tmp_path / "m")
    gqa_model.save_pretrained(tmp_path / "m")
    model, tokenizer, folder = load_model(str(tmp_path / "m"))
    assert folder == (tmp_path / "m").resolve()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, gqa_model(ids).logits)
    assert tokenizer("w5 w6").input_ids == [5, 6]


def test_unsupported_architecture_is_named(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*Llama-family"):
        load_model(str(tmp_path / "gpt2"))


def test_missing_inputs(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_gguf_that_is_not_a_llama_is_refused_before_loading_weights(tmp_path):
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="GGUF of architecture 'gpt2'"):
        load_model(str(path))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(str(tmp_path / "broken.gguf"))


@pytest.mark.integration
def test_embedded_gguf_is_converted_once_and_then_loads_from_the_cache(tmp_path, monkeypatch):
    """The first load saves a verified checkpoint in the cache; the next one reads it without parsing the GGUF."""
    import time

    import dms_llm.loading as loading

    monkeypatch.setenv("DMS_LLM_CACHE", str(tmp_path / "cache"))
    first, tok, source = load_model("smollm2-135m")
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and (folders[0] / "dms_conversion.json").exists()
    assert (folders[0] / "model.safetensors").exists() and (folders[0] / "tokenizer.json").exists()

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF header must not be read when a conversion is cached")

    monkeypatch.setattr(loading, "gguf_architecture", no_gguf)
    t0 = time.perf_counter()
    second, tok2, source2 = load_model("smollm2-135m")
    assert time.perf_counter() - t0 < 15 and source2 == source  # the source is still the wheel's folder
    ids = torch.tensor([tok("The capital of France is").input_ids])
    assert tok2("The capital of France is").input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    assert "smollm2" in loading.describe_cache().lower()
    assert loading.clear_cache() == f"removed {tmp_path / 'cache'}" and not (tmp_path / "cache").exists()
