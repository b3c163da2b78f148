"""GGUF files for llama.cpp: every export shape written, loaded by llama.cpp (llama-cpp-python) and compared with the
Hugging Face export's logits; the tokenizer copied or built; quantization through llama.cpp; bad inputs."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from dms_llm.errors import DMSError
from dms_llm.exporter import export
from dms_llm.gates import hard_masked
from dms_llm.gguf_export import (
    CHECK_TEXT,
    GGUFExportError,
    channel_multiple_for,
    check_gguf_type,
    llama_logits,
    open_llama,
    write_gguf,
)
from dms_llm.structure import ModelShape, Structure

from .conftest import TEXT, char_tokenizer, tiny_llama

VOCAB = 320


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE tokenizer (GPT-2 style), trained here, so tiny models get a real GGUF vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tk.train_from_iterator([TEXT, CHECK_TEXT], trainer)
    assert tk.get_vocab_size() == VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny(**kwargs):
    model = tiny_llama(**kwargs)
    return with_bpe_vocabulary(model)


def with_bpe_vocabulary(model):
    """``model`` resized to the BPE vocabulary, with random rows and sharp q/k weights."""
    model.resize_token_embeddings(VOCAB)
    with torch.no_grad():  # resized rows are random too, so every token's logits mean something
        model.get_input_embeddings().weight.normal_(0, 1)
        if not model.config.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0, 0.3)
        for name, p in model.named_parameters():  # sharp attention, so a wrong rotary layout changes the logits
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.3)
    return model


def per_layer(model):
    """Per-layer widths with every case llama.cpp's deci must be told about: a removed attention in the first layer,
    a removed MLP whose attention stays, a removed layer, a removed attention elsewhere, narrowed widths."""
    s = Structure.dense(ModelShape.from_model(model))
    s.layers[0].kv_heads = []
    s.layers[1].kv_heads, s.layers[1].channels = s.layers[1].kv_heads[1:], s.layers[1].channels[:64]
    s.layers[2].channels = []
    s.layers[3].kv_heads, s.layers[3].channels = [], []
    s.layers[4].kv_heads = []
    return s


def uniform(model):
    s = Structure.dense(ModelShape.from_model(model))
    for layer in s.layers:
        layer.kv_heads, layer.channels = layer.kv_heads[:1], layer.channels[:64]
    s.layers[2].kv_heads, s.layers[2].channels = [], []
    return s


def _cpp_and_hf_logits(gguf_file, folder, ids, remote_code):
    llm = open_llama(gguf_file, n_ctx=64, threads=2)
    try:
        got = llama_logits(llm, ids)
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote_code)
    with torch.no_grad():
        return got, model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("kv,tie,bias,shape", [(2, True, False, "per-layer"), (4, False, False, "per-layer"),
                                               (1, False, True, "per-layer"), (2, True, False, "uniform"),
                                               (4, False, True, "uniform")])
def test_llama_cpp_reproduces_the_export(tmp_path, bpe_tokenizer, kv, tie, bias, shape):
    """GQA and MHA, tied and untied embeddings, biases; per-layer (deci) and uniform (llama) exports: llama.cpp's
    logits equal the Hugging Face export's, and the file says what llama.cpp needs per layer."""
    model = tiny(num_kv_heads=kv, num_heads=4, layers=5, tie=tie, hidden=64, intermediate=96, bias=bias)
    structure = per_layer(model) if shape == "per-layer" else uniform(model)
    folder = export(model, structure, tmp_path / "pruned", tokenizer=bpe_tokenizer).path
    result = write_gguf(folder, tmp_path / "m.gguf", "f32")
    assert result.architecture == ("deci" if shape == "per-layer" else "llama")
    assert result.tokenizer == "built from the Hugging Face tokenizer" and result.check["tokenization"] == "identical"
    ids = [0] + bpe_tokenizer(CHECK_TEXT[:200]).input_ids[:40]
    got, expected = _cpp_and_hf_logits(result.path, folder, ids, shape == "per-layer")
    assert (got - expected).abs().max() <= 1e-3
    reader = gguf.GGUFReader(str(result.path))
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not tie)
    assert any(n.endswith("attn_q.bias") for n in names) == bias == any(n.endswith("ffn_up.bias") for n in names)
    if shape == "per-layer":  # kept layers 0, 1, 2, 4 -> blocks 0..3
        heads = reader.fields["deci.attention.head_count"].contents()
        ffn = reader.fields["deci.feed_forward_length"].contents()
        group = 4 // kv
        assert heads == [group, 4 - group, 4, 0]  # layer 0's removed attention is one zero KV group
        assert ffn == [96, 64, 32, 96]  # the removed MLP of a layer with attention is a zero MLP of 32
        down = next(t for t in reader.tensors if t.name == "blk.2.ffn_down.weight")
        assert not down.data.any()
    else:
        assert reader.fields["llama.feed_forward_length"].contents() == 64
    assert not list(tmp_path.glob(".*"))


def test_quantized_types_report_what_did_not_quantize(tmp_path, bpe_tokenizer):
    """q8_0 through llama.cpp's quantizer: widths that are multiples of 32 quantize; a width of 40 stays f16 and is
    reported; the perplexity check against the Hugging Face model passes."""
    model = tiny(layers=3, hidden=64, intermediate=96)
    s = Structure.dense(ModelShape.from_model(model))
    s.layers[1].channels = s.layers[1].channels[:40]
    folder = export(model, s, tmp_path / "p", tokenizer=bpe_tokenizer).path
    result = write_gguf(folder, tmp_path / "q.gguf", "q8_0")
    assert [f["tensor"] for f in result.fallbacks] == ["blk.1.ffn_down.weight"]
    assert result.fallbacks[0]["type"] in ("F16", "F32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(result.path)).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.1.ffn_up.weight"] == "Q8_0"
    assert result.check["ppl_llama_cpp"] <= 1.05 * result.check["ppl_hf"]
    f16 = write_gguf(folder, tmp_path / "h.gguf", "f16")
    assert f16.check["max_abs_logit_diff"] <= 3e-2 and result.bytes < f16.bytes
    assert channel_multiple_for("q4_k_m") == 32 and channel_multiple_for("f16") == 8


def test_weight_repacking_is_off_while_loading_where_llama_cpp_has_amx(monkeypatch):
    """llama.cpp's AMX repacking segfaults on the first forward (docs/DESIGN.md §8): open_llama loads without it on
    AMX CPUs, with llama.cpp's default elsewhere or when asked, and leaves llama.cpp's defaults as they were."""
    import llama_cpp

    from dms_llm import gguf_export

    seen = []
    monkeypatch.setattr(llama_cpp, "Llama", lambda **kw: seen.append(
        llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts))
    for amx, repack, expected in ((True, None, False), (False, None, True), (True, True, True), (False, False, False)):
        monkeypatch.setattr(gguf_export, "llama_cpp_has_amx", lambda amx=amx: amx)
        open_llama(Path("m.gguf"), n_ctx=8, threads=1, repack=repack)
        assert seen.pop() is expected
        assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True


def test_bad_inputs_stop_with_a_message_and_leave_nothing(tmp_path, bpe_tokenizer, monkeypatch):
    with pytest.raises(DMSError, match="unknown GGUF type"):
        check_gguf_type("q9_9")
    with pytest.raises(DMSError, match="not a dms-llm or Hugging Face export"):
        write_gguf(tmp_path, tmp_path / "x.gguf")
    model = tiny(layers=2)
    folder = export(model, Structure.dense(ModelShape.from_model(model)), tmp_path / "d", tokenizer=bpe_tokenizer).path
    with pytest.raises(DMSError, match="into the input folder"):
        write_gguf(folder, folder / "x.gguf")
    (tmp_path / "exists.gguf").write_text("mine")
    with pytest.raises(DMSError, match="overwrite"):
        write_gguf(folder, tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_text() == "mine"
    with pytest.raises(DMSError, match=r"must end in \.gguf"):
        write_gguf(folder, tmp_path / "x.bin")
    import dms_llm.gguf_export as ge

    with monkeypatch.context() as m:  # a full disk is found before anything is written
        m.setattr(ge.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
        with pytest.raises(GGUFExportError, match="free disk space"):
            write_gguf(folder, tmp_path / "full.gguf")
    assert not list(tmp_path.glob("*full*"))
    # a character-level (WordLevel) tokenizer has no exact llama.cpp counterpart: refused, nothing written
    char = tiny_llama(layers=2)
    folder = export(char, Structure.dense(ModelShape.from_model(char)), tmp_path / "c", tokenizer=char_tokenizer()).path
    with pytest.raises(GGUFExportError, match="not a byte-level BPE tokenizer"):
        write_gguf(folder, tmp_path / "c.gguf")
    assert not (tmp_path / "c.gguf").exists() and not list(tmp_path.glob(".c.tmp-*"))
    # a folder without tokenizer files (transformers would make up an empty one): refused, nothing written
    from transformers import Qwen2Config

    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    AutoModelForCausalLM.from_config(Qwen2Config(**shape)).save_pretrained(tmp_path / "qwen")
    with pytest.raises(DMSError, match="holds no tokenizer"):
        write_gguf(tmp_path / "qwen", tmp_path / "qwen.gguf")
    # a family dms-llm writes no GGUF of: refused by name
    from transformers import GPT2Config

    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)).save_pretrained(
        tmp_path / "gpt2")
    char_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(DMSError, match="'gpt2' model.*Llama, Mistral, Qwen2, Qwen3 and Gemma 3"):
        write_gguf(tmp_path / "gpt2", tmp_path / "gpt2.gguf")
    assert not (tmp_path / "gpt2.gguf").exists() and not list(tmp_path.glob(".gpt2*"))


def test_a_failed_check_leaves_no_file(tmp_path, bpe_tokenizer, monkeypatch):
    import dms_llm.gguf_export as ge

    model = tiny(layers=2)
    folder = export(model, Structure.dense(ModelShape.from_model(model)), tmp_path / "d", tokenizer=bpe_tokenizer).path
    monkeypatch.setattr(ge, "_permute", lambda w, n: w)  # a writer bug: q/k rows in the wrong rotary layout
    with pytest.raises(GGUFExportError, match="differ from the model"):
        write_gguf(folder, tmp_path / "bad.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*gguf"))


def test_cli_gguf_and_help_defaults(tmp_path, bpe_tokenizer):
    model = tiny(layers=3)
    folder = export(model, per_layer_3(model), tmp_path / "p", tokenizer=bpe_tokenizer).path
    proc = subprocess.run([sys.executable, "-m", "dms_llm", "gguf", str(folder), "--type", "f16"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "p-f16.gguf").is_file() and "tokenization identical" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "dms_llm", "gguf", str(folder), "--type", "f16"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    for command in ("prune", "finetune", "gguf"):
        text = subprocess.run([sys.executable, "-m", "dms_llm", command, "--help"], capture_output=True, text=True,
                              env={"COLUMNS": "300", **__import__("os").environ}).stdout
        for line in text.splitlines():
            assert line.count("default") <= 1, line
    help_prune = subprocess.run([sys.executable, "-m", "dms_llm", "prune", "--help"], capture_output=True, text=True,
                                env={"COLUMNS": "300", **__import__("os").environ}).stdout
    no_recon = next(line for line in help_prune.splitlines() if "--no-reconstruct" in line)
    assert "True" not in no_recon
    device = next(line for line in help_prune.splitlines() if "--device " in line)
    assert "None" not in device


def per_layer_3(model):
    s = Structure.dense(ModelShape.from_model(model))
    s.layers[0].channels = s.layers[0].channels[:64]
    s.layers[1].channels = []
    s.layers[2].kv_heads = [0]
    return s


@pytest.mark.integration
def test_smollm2_export_runs_in_llama_cpp_with_its_own_tokenizer(tmp_path):
    """The embedded default, per-layer: the GGUF copies the source GGUF's tokenizer (llama.cpp tokenizes the check
    text as the export's tokenizer does), its logits equal the export's, greedy decoding starts with the same tokens."""
    import dms_llm

    model, tokenizer, source = dms_llm.load_model("smollm2-135m")
    s = Structure.dense(ModelShape.from_model(model))
    for i, layer in enumerate(s.layers):
        layer.channels = layer.channels[: 1536 - 256 * (i % 3)]
        layer.kv_heads = layer.kv_heads[: 3 - (i % 2)]
    s.layers[0].kv_heads, s.layers[7].channels, s.layers[20].kv_heads = [], [], []
    folder = export(model, s, tmp_path / "smol", tokenizer=tokenizer, source_dir=source,
                    metadata={"base_model": "smollm2-135m"}).path
    result = write_gguf(folder, tmp_path / "smol.gguf", "f16")
    assert result.tokenizer.startswith("copied from SmolLM2-135M-Instruct")
    assert result.check["same_argmax"] >= 0.95
    pruned = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    prompt = tokenizer("The capital of France is").input_ids
    hf = pruned.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    llm = open_llama(result.path, n_ctx=64, threads=2, logits_all=False)
    try:
        cpp = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            cpp.append(token)
            if len(cpp) == 8:
                break
    finally:
        llm.close()
    assert cpp[:4] == hf[:4]
    info = json.loads((folder / "dms_structure.json").read_text())
    assert info["format"].startswith("per-layer")


def test_prune_with_a_quantized_gguf_rounds_widths_so_every_tensor_quantizes(tmp_path, bpe_tokenizer, text_file):
    """`dms-llm prune --gguf q8_0` checks the GGUF target before loading, rounds MLP widths to multiples of 32 and
    writes <out>-q8_0.gguf beside the folder, every 2-D tensor quantized."""
    dense = tmp_path / "dense"
    tiny(layers=3, intermediate=128).save_pretrained(dense)
    bpe_tokenizer.save_pretrained(dense)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "dms_llm", "prune", str(dense), "--keep", "0.85", "--steps", "3", "--seq-len", "32",
            "--num-samples", "4", "--calib", str(text_file), "--no-eval", "--out", str(out), "--quiet"]
    bad = subprocess.run(args + ["--gguf", "q9_9"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown GGUF type --gguf q9_9" in bad.stderr and not out.exists()
    proc = subprocess.run(args + ["--gguf", "q8_0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "dms_structure.json").read_text())
    assert all(w % 32 == 0 for w in info["kept_mlp_channels"]) and "--channel-multiple 32" in info["command"]
    path = tmp_path / "out-q8_0.gguf"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2}
    assert set(types.values()) == {"Q8_0"}, types
    assert "wrote " + str(path) in proc.stdout and "not quantized" not in proc.stdout
    shutil.rmtree(out)  # the folder is gone, its GGUF is not: refused before any work, the GGUF kept
    again = subprocess.run(args + ["--gguf", "q8_0"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "out-q8_0.gguf exists" in again.stderr and "--overwrite" in again.stderr
    assert not out.exists() and path.is_file()


def family_model(family: str):
    """A tiny random model of another family (tests/test_families.py), with the BPE vocabulary and sharp q/k."""
    from .test_families import tiny as tiny_family

    model = tiny_family(family)
    if family in ("mistral", "qwen2_windows"):
        model.config.sliding_window = 48  # longer than the logits compared below, shorter than the check text
    return with_bpe_vocabulary(model)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "llama3", "qwen2_windows"])
@pytest.mark.parametrize("shape", ["per-layer", "uniform"])
def test_llama_cpp_reproduces_other_families(tmp_path, bpe_tokenizer, family, shape):
    """Qwen2 (q/k/v biases, permuted with their rows), Mistral and Qwen2 with windows on some layers (the window
    becomes the declared context), Llama 3 (rope_freqs): llama.cpp's logits equal the export's."""
    from .test_families import removals

    model = family_model(family)
    if shape == "per-layer":
        structure = removals(model)
    else:
        structure = Structure.dense(ModelShape.from_model(model))
        for layer in structure.layers:
            layer.kv_heads, layer.channels = layer.kv_heads[:1], layer.channels[:64]
    folder = export(model, structure, tmp_path / "pruned", tokenizer=bpe_tokenizer).path
    result = write_gguf(folder, tmp_path / "m.gguf", "f32")
    assert result.architecture == ("deci" if shape == "per-layer" else "llama")
    ids = [0] + bpe_tokenizer(CHECK_TEXT[:200]).input_ids[:40]
    got, expected = _cpp_and_hf_logits(result.path, folder, ids, shape == "per-layer")
    assert (got - expected).abs().max() <= 1e-3
    reader = gguf.GGUFReader(str(result.path))
    names = {t.name for t in reader.tensors}
    assert any(n.endswith("attn_q.bias") for n in names) == family.startswith("qwen2")
    assert ("rope_freqs.weight" in names) == (family == "llama3")
    context = reader.fields[f"{result.architecture}.context_length"].contents()
    assert context == (48 if family in ("mistral", "qwen2_windows") else 256)


def gemma3_llama_cpp_computes():
    """A tiny Gemma 3 whose computation llama.cpp's gemma3 has: queries scaled by 1 / sqrt(head size), no final
    soft-cap (the tiny family config has both other ways, and a window of 8 tokens: the check crosses it)."""
    model = family_model("gemma3")
    model.config.query_pre_attn_scalar, model.config.final_logit_softcapping = model.config.head_dim, None
    for layer in model.model.layers:
        layer.self_attn.scaling = model.config.head_dim ** -0.5
    return model


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_uniform_qwen3_and_gemma3_exports_run_in_llama_cpps_own_architectures(tmp_path, bpe_tokenizer, family):
    """Uniform exports of Qwen3 (q/k norms) and Gemma 3 (sandwich norms stored as 1 + weight, scaled embeddings,
    sliding windows with their own rope base) are llama.cpp's qwen3 / gemma3 GGUFs: its logits equal the export's."""
    model = gemma3_llama_cpp_computes() if family == "gemma3" else family_model(family)
    structure = Structure.dense(ModelShape.from_model(model))
    for layer in structure.layers:
        layer.kv_heads, layer.channels = layer.kv_heads[:1], layer.channels[:64]
    folder = export(model, structure, tmp_path / "pruned", tokenizer=bpe_tokenizer).path
    result = write_gguf(folder, tmp_path / "m.gguf", "f32")
    assert result.architecture == family and result.check["tokenization"] == "identical"
    ids = [0] + bpe_tokenizer(CHECK_TEXT[:200]).input_ids[:40]
    got, expected = _cpp_and_hf_logits(result.path, folder, ids, False)
    # the f32 tolerance of the writer's own check (Gemma's logits here reach 60: 1e-3 of them apart)
    assert (got - expected).abs().max() <= 3e-3 * max(1.0, float(expected.abs().max()) / 10)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    names = {t.name for t in gguf.GGUFReader(str(result.path)).tensors}
    assert "blk.0.attn_q_norm.weight" in names and ("blk.0.post_ffw_norm.weight" in names) == (family == "gemma3")


def test_families_llama_cpp_cannot_express_are_refused(tmp_path, bpe_tokenizer):
    """Per-layer Qwen3 / Gemma 3 (deci has no q/k norms; their own architectures size every layer alike), and Gemma 3
    settings llama.cpp's gemma3 does not compute, stop with what is missing; no file is left."""
    from .test_families import removals

    for family, model_type in (("qwen3", "qwen3"), ("gemma3", "gemma3_text")):
        model = family_model(family)
        folder = export(model, removals(model), tmp_path / f"{family}-per-layer", tokenizer=bpe_tokenizer).path
        with pytest.raises(DMSError, match=f"per-layer '{model_type}' model.*q/k norms.*--format uniform"):
            write_gguf(folder, tmp_path / f"{family}-per-layer.gguf", "f32")
    model = family_model("gemma3")  # query_pre_attn_scalar 32 with head size 16, final soft-cap 5
    folder = export(model, Structure.dense(ModelShape.from_model(model)), tmp_path / "gemma3",
                    tokenizer=bpe_tokenizer).path
    with pytest.raises(DMSError, match="gemma3 architecture has no place for query_pre_attn_scalar 32.*soft-cap"):
        write_gguf(folder, tmp_path / "gemma3.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf"))


def test_prune_gguf_of_a_per_layer_qwen3_stops_before_the_search(tmp_path, bpe_tokenizer, text_file):
    dense = tmp_path / "dense"
    family_model("qwen3").save_pretrained(dense)
    bpe_tokenizer.save_pretrained(dense)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "dms_llm", "prune", str(dense), "--keep", "0.85", "--steps", "3", "--seq-len", "32",
            "--num-samples", "4", "--calib", str(text_file), "--no-eval", "--out", str(out), "--quiet", "--gguf", "f16",
            "--format", "per-layer"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "'qwen3' architecture" in proc.stderr and "--format uniform" in proc.stderr, \
        proc.stderr[-2000:]
    assert "step 1/" not in proc.stdout + proc.stderr and not out.exists()


@pytest.mark.parametrize("family,arch", [("qwen2", "qwen2"), ("mistral", "llama")])
def test_gguf_files_of_other_families_load_like_the_embedded_default(tmp_path, bpe_tokenizer, family, arch,
                                                                      monkeypatch):
    """A Qwen2 GGUF (llama.cpp's own qwen2 architecture: neox rotary, q/k unpermuted, as llama.cpp's converter writes
    it) and a Mistral one (architecture llama) load through dms-llm's GGUF path (transformers dequantizes them) with
    the model's logits."""
    import dms_llm.gguf_export as writer
    from dms_llm.loading import load_model

    model = family_model(family)
    model.config.sliding_window = None
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    if arch == "qwen2":
        layout = writer._layout
        monkeypatch.setattr(writer, "_layout", lambda config: dataclasses.replace(layout(config), arch="qwen2"))
        monkeypatch.setattr(writer, "_permute", lambda w, n_head: w)
    path = write_gguf(folder, tmp_path / f"{family}.gguf", "f32").path
    monkeypatch.undo()
    loaded, tokenizer, _ = load_model(str(path))
    assert loaded.config.model_type == arch  # a Mistral GGUF is a llama one, as llama.cpp's converter writes it
    ids = torch.tensor([bpe_tokenizer(CHECK_TEXT[:120]).input_ids])
    assert len(tokenizer) == VOCAB  # (transformers rebuilds a qwen2 GGUF's tokenizer with Qwen2's own split rule)
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-4


def llama_cpp_named_gguf(model, tokenizer, path, arch: str):
    """A GGUF of llama.cpp's own ``arch`` (qwen3, gemma3) laid out as llama.cpp's converter writes it: tensors under
    gguf-py's names for that architecture, q/k not permuted (these architectures rotate halves, as Hugging Face does),
    Gemma's norms stored as 1 + weight. dms-llm does not write these (its writer targets llama / deci); users bring
    them from the Hub."""
    from dms_llm.gguf_export import _build_tokenizer

    c = model.config
    names = gguf.get_tensor_name_map({"qwen3": gguf.MODEL_ARCH.QWEN3, "gemma3": gguf.MODEL_ARCH.GEMMA3}[arch],
                                     c.num_hidden_layers)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    writer = gguf.GGUFWriter(str(path), arch)
    for add, value in [("context_length", c.max_position_embeddings), ("embedding_length", c.hidden_size),
                       ("block_count", c.num_hidden_layers), ("feed_forward_length", c.intermediate_size),
                       ("head_count", c.num_attention_heads), ("head_count_kv", c.num_key_value_heads),
                       ("key_length", c.head_dim), ("value_length", c.head_dim),
                       ("layer_norm_rms_eps", c.rms_norm_eps), ("rope_freq_base", rope["rope_theta"])]:
        getattr(writer, f"add_{add}")(value)
    if arch == "gemma3":
        writer.add_sliding_window(c.sliding_window)
    _build_tokenizer(writer, tokenizer, c.vocab_size)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])  # also the names of llama.cpp's architectures
def test_qwen3_and_gemma3_gguf_files_load_like_the_embedded_default(tmp_path, bpe_tokenizer, family):
    """GGUF files of Qwen3 and Gemma 3 (llama.cpp's qwen3 / gemma3 architectures) load through dms-llm's GGUF path
    with the model's logits, and prune per layer from there."""
    from dms_llm.loading import load_model

    from .test_families import removals, tiny

    # what these GGUFs can say: transformers reads no head size for qwen3 (Qwen3Config's 128, as in every Qwen3
    # release) and no query scale or softcap for gemma3 (256 and none, as in Gemma 3's releases)
    said = {"head_dim": 128} if family == "qwen3" else {"query_pre_attn_scalar": 256, "final_logit_softcapping": None}
    model = with_bpe_vocabulary(tiny(family, **said))
    path = llama_cpp_named_gguf(model, bpe_tokenizer, tmp_path / f"{family}.gguf", family)
    loaded, tokenizer, _ = load_model(str(path))
    assert type(loaded) is type(model) and loaded.config.model_type == model.config.model_type
    ids = torch.tensor([bpe_tokenizer(CHECK_TEXT[:120]).input_ids])
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-4
    s = removals(loaded)
    reloaded = AutoModelForCausalLM.from_pretrained(export(loaded, s, tmp_path / "p").path, trust_remote_code=True)
    with torch.no_grad(), hard_masked(loaded, s):
        assert (reloaded(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max() <= 1e-4


def test_the_readmes_gguf_example_runs_from_the_folder_that_holds_the_file(tmp_path, bpe_tokenizer, text_file):
    """`dms-llm prune model.gguf --keep ... --out pruned` in the folder of model.gguf writes pruned/ beside it and
    leaves the file as it was: the file is the source, not its folder."""
    dense = tmp_path / "dense"
    tiny(layers=3, intermediate=128).save_pretrained(dense)
    bpe_tokenizer.save_pretrained(dense)
    work = tmp_path / "work"
    work.mkdir()
    write_gguf(dense, work / "model.gguf", "f32")
    before = (work / "model.gguf").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "dms_llm", "prune", "model.gguf", "--keep", "0.85", "--steps", "2",
                           "--seq-len", "32", "--num-samples", "4", "--calib", str(text_file), "--no-eval",
                           "--no-reconstruct", "--format", "uniform", "--out", "pruned", "--quiet"],
                          cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (work / "pruned" / "config.json").is_file() and (work / "model.gguf").read_bytes() == before
