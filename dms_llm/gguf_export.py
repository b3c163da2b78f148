"""Write a dms-llm (or any Hugging Face Llama) checkpoint as a GGUF file for llama.cpp, checked by llama.cpp itself
(docs/DESIGN.md §8).

- A per-layer export becomes llama.cpp's ``deci`` architecture: query heads, KV heads and MLP width are per-layer
  arrays, and a layer with 0 heads is attention-free. Two shapes ``deci`` cannot compute as written are rewritten
  into ones it computes exactly: a layer that keeps its attention but not its MLP gets a zero MLP of
  ``ZERO_MLP_WIDTH`` channels (``deci`` skips a layer with ``feed_forward_length`` 0 *whole*, attention included),
  and a removed attention in the first layer becomes one zero KV group (llama.cpp reads the head size from layer 0's
  head count). A zero ``down_proj`` / ``o_proj`` adds exactly nothing.
- A uniform export (a stock ``LlamaForCausalLM``) becomes a plain ``llama`` GGUF.
- q/k rows are permuted to the pairwise rotary layout llama.cpp uses; Llama 3 rope scaling becomes ``rope_freqs``.
- The tokenizer is copied from the source GGUF when the model came from one (the embedded default), else built from
  the Hugging Face tokenizer (byte-level BPE); a tokenizer that cannot be mapped exactly stops the write.
- f32 and f16 are written directly; every other type (bf16, q8_0, q4_k_m, ...) by llama.cpp's own quantizer
  (llama-cpp-python) from an f32 file.

Every file is written to a temporary file beside the target, loaded by llama.cpp, which must tokenize a check text
as the Hugging Face tokenizer does and reproduce the Hugging Face logits on it (f32/f16/bf16) or stay within a
perplexity bound of them (quantized types), and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DMSError
from .folder import check_writable_parent

logger = logging.getLogger("dms_llm")

# GGUF type names -> llama.cpp's LLAMA_FTYPE_* suffix; f32 and f16 are written here, the others by llama.cpp
GGUF_TYPES = {
    "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K", "q5_k_m": "MOSTLY_Q5_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1", "q4_k_m": "MOSTLY_Q4_K_M", "q4_k_s": "MOSTLY_Q4_K_S", "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1", "q3_k_l": "MOSTLY_Q3_K_L", "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_s": "MOSTLY_Q3_K_S",
    "q2_k": "MOSTLY_Q2_K",
}
FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_ROW_MULTIPLE = 32  # rows of every quantized type split into blocks of 32 (k-quants 256, else a 32-block type)
ZERO_MLP_WIDTH = 32  # width of the zero MLP that stands for a removed one in deci (quantizes in every type)
# how much worse than the Hugging Face model a quantized file may be on the check text (perplexity ratio)
QUANT_PPL_BOUND = {"q8_0": 1.05, "q6_k": 1.1, "q5_k_m": 1.15, "q5_k_s": 1.15, "q5_0": 1.15, "q5_1": 1.15,
                   "q4_k_m": 1.35, "q4_k_s": 1.4, "q4_0": 1.5, "q4_1": 1.5, "q3_k_l": 1.8, "q3_k_m": 2.0,
                   "q3_k_s": 2.5, "q2_k": 4.0}
LOGIT_TOLERANCE = {"f32": 3e-3, "f16": 1e-1, "bf16": 4e-1}  # max abs logit diff, x max|logit| / 10 above 10
GGUF_FAMILIES = ("llama", "dms_llama", "mistral", "qwen2")  # what llama.cpp's llama / deci architectures compute
# uniform exports of these families are written as llama.cpp's own architecture of that name (gguf-py's tensor
# names, q/k rows as Hugging Face keeps them: these architectures rotate halves); their per-layer exports are not:
# llama.cpp sizes every layer of them from layer 0's head count and width, and deci has no q/k norms
OWN_ARCHITECTURES = {"qwen3": "qwen3", "gemma3_text": "gemma3"}

CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew 384,400 km; 12.5% of 2048 is 256.\n"
    "def mean(xs):\n    return sum(xs) / len(xs)  # O(n)\n\n"
    "Zürich, café, naïve — «quotes», ‘single’, 东京 and Ελληνικά; emoji 🙂👍.\tTabs\tand   spaces.\n"
    "Python's documentation says: \"Errors should never pass silently.\" It's 9:30 a.m., isn't it?\n"
    "Pruning removes attention heads, MLP channels and whole layers; the smaller model keeps most of its quality "
    "when the search chooses what to keep under a budget, and a short repair of the kept weights recovers more. "
    "Numbers like 3.14159, 2.71828 and 1,000,000 appear in text as often as names like Ada Lovelace or Alan Turing."
)


class GGUFExportError(DMSError, RuntimeError):
    """The GGUF file could not be written, or llama.cpp did not reproduce the model."""


@dataclass
class GGUFResult:
    path: Path
    type: str
    architecture: str  # "llama" or "deci"
    bytes: int
    tokenizer: str  # where the tokenizer came from
    check: dict  # what llama.cpp's check measured
    fallbacks: list[dict] = field(default_factory=list)  # tensors not quantized to the asked type's block size


def check_gguf_type(gguf_type: str, setting: str = "gguf_type") -> str:
    """The canonical name of a GGUF type; DMSError naming ``setting`` for an unknown one."""
    name = str(gguf_type).lower()
    if name not in GGUF_TYPES:
        raise DMSError(f"unknown GGUF type `{setting}={gguf_type}`; choose one of {', '.join(GGUF_TYPES)}")
    return name


def channel_multiple_for(gguf_type: str | None, default: int = 8) -> int:
    """The MLP width multiple a prune should use so that every tensor of a ``gguf_type`` file quantizes (no f16
    fallback): 32 for quantized types, ``default`` otherwise."""
    if gguf_type is None or check_gguf_type(gguf_type, "gguf") in FLOAT_TYPES:
        return default
    return math.lcm(default, QUANT_ROW_MULTIPLE)


def _require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ImportError("writing and checking GGUF files needs llama-cpp-python (it compiles llama.cpp, several "
                          "minutes): pip install 'dms-llm[llamacpp]'") from None
    return llama_cpp


# --------------------------------------------------------------------------------------------------------------------
# reading the checkpoint


def _read_folder(folder: Path) -> tuple[dict, dict]:
    """(config.json, dms_structure.json or {}) of a Hugging Face checkpoint folder; DMSError when it is none."""
    if not folder.is_dir():
        raise DMSError(f"{folder} is not a folder; give the output folder of `dms-llm prune` / `finetune` or a "
                       f"Hugging Face checkpoint folder")
    config_file = folder / "config.json"
    if not config_file.is_file() or not list(folder.glob("*.safetensors")):
        raise DMSError(f"{folder} holds no config.json and *.safetensors: it is not a dms-llm or Hugging Face "
                       f"export (save it with save_pretrained, or run dms-llm prune first)")
    config = json.loads(config_file.read_text())
    check_gguf_family(config, str(folder))
    structure = folder / "dms_structure.json"
    return config, (json.loads(structure.read_text()) if structure.is_file() else {})


def check_gguf_family(config: dict, what: str) -> None:
    """DMSError unless llama.cpp's llama / deci architectures compute the model of ``config`` (a config.json dict)."""
    model_type = config.get("model_type")
    family = config.get("source_model_type", model_type)
    if model_type in OWN_ARCHITECTURES:
        if model_type == "gemma3_text":
            _check_gemma3(config, what)
        return
    if model_type not in GGUF_FAMILIES or family not in GGUF_FAMILIES or config.get("qk_norm"):
        missing = {"qwen3": "per-head q/k norms",
                   "gemma3_text": "Gemma 3's norms after each block, scaled embeddings and per-head q/k norms"}
        if model_type != "dms_llama":
            raise DMSError(f"{what} is a {family!r} model; dms-llm writes GGUF files of Llama, Mistral, Qwen2, Qwen3 "
                           f"and Gemma 3 text models")
        own = (f"; a uniform export (`--format uniform`) of it is written as llama.cpp's own "
               f"{OWN_ARCHITECTURES[family]!r} architecture, which sizes every layer alike"
               if family in OWN_ARCHITECTURES else "")
        raise DMSError(f"{what} is a per-layer {family!r} model; dms-llm writes per-layer GGUF files of Llama, Mistral "
                       f"and Qwen2 exports (llama.cpp's deci architecture), which has no place for "
                       f"{missing.get(family, 'per-head q/k norms' if config.get('qk_norm') else 'this family')}{own}")


def check_per_layer_gguf(model_type: str, what: str) -> None:
    """DMSError when a per-layer export of a ``model_type`` model cannot become a GGUF (llama.cpp runs that family
    as its own architecture, which sizes every layer alike); ``what`` names the request in the message."""
    own = OWN_ARCHITECTURES.get(model_type)
    if own:
        raise DMSError(f"{what}: llama.cpp runs {model_type} models as its {own!r} architecture, which sizes every "
                       f"layer alike; use --format uniform (or auto) with --gguf, or drop --gguf for a per-layer model")


def _check_gemma3(config: dict, what: str) -> None:
    """DMSError where llama.cpp's gemma3 computes something else than this Gemma 3 config: it scales queries by
    1 / sqrt(head size), has no final soft-cap and puts a global layer after every five sliding ones."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    n = config["num_hidden_layers"]
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    problems = []
    if config.get("query_pre_attn_scalar") not in (None, head_dim):
        problems.append(f"query_pre_attn_scalar {config['query_pre_attn_scalar']} (llama.cpp scales by the head "
                        f"size, {head_dim})")
    if config.get("final_logit_softcapping"):
        problems.append("a final logit soft-cap")
    if config.get("attn_logit_softcapping"):
        problems.append("an attention logit soft-cap")
    if config.get("layer_types") not in (None, pattern):
        problems.append("layer types other than five sliding layers, then a global one")
    if problems:
        raise DMSError(f"{what}: llama.cpp's gemma3 architecture has no place for {'; '.join(problems)}")


class _Tensor:
    """A tensor of the checkpoint (or one made up for llama.cpp), read only when asked for, as fp32 on the CPU."""

    def __init__(self, shape, read):
        self.shape, self.read = tuple(shape), read

    def map(self, fn) -> "_Tensor":
        return _Tensor(self.shape, lambda: fn(self.read()))

    @classmethod
    def filled(cls, shape, value: float) -> "_Tensor":
        return cls(shape, lambda: torch.full(shape, float(value)))


def _tensors(folder: Path) -> dict[str, _Tensor]:
    """Every tensor of the folder's safetensors files, by name (shapes from the headers; data read lazily)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        handle = safe_open(str(f), framework="pt")
        for name in handle.keys():
            out[name] = _Tensor(handle.get_slice(name).get_shape(),
                                lambda n=name, h=handle: h.get_tensor(n).float())
    return out


@dataclass
class _Layout:
    """What llama.cpp is told about the model: architecture, per-layer widths (after the zero-block rewrite)."""

    arch: str
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    zero_attention: set[int]
    zero_mlp: set[int]


def _layout(config: dict) -> _Layout:
    n = config["num_hidden_layers"]
    n_heads, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    group = n_heads // n_kv
    if config["model_type"] != "dms_llama":
        return _Layout(OWN_ARCHITECTURES.get(config["model_type"], "llama"), [n_heads] * n, [n_kv] * n,
                       [config["intermediate_size"]] * n, set(), set())
    kv = list(config["layer_num_key_value_heads"])
    ffn = list(config["layer_intermediate_sizes"])
    zero_attention = {0} if kv[0] == 0 else set()
    zero_mlp = {i for i in range(n) if ffn[i] == 0}
    kv = [1 if i in zero_attention else k for i, k in enumerate(kv)]
    ffn = [ZERO_MLP_WIDTH if i in zero_mlp else f for i, f in enumerate(ffn)]
    return _Layout("deci", [k * group for k in kv], kv, ffn, zero_attention, zero_mlp)


def context_length(config: dict) -> int:
    """The context the GGUF declares: the model's, or its sliding window when it has one (llama.cpp's llama / deci
    attend to the whole context, which is the model's own computation up to the window's length)."""
    context = config.get("max_position_embeddings", 2048)
    if config.get("model_type") == "gemma3_text":  # llama.cpp's gemma3 has the sliding windows itself
        return context
    windows = [config.get("sliding_window")]
    if isinstance(config.get("layer_types"), list) and "sliding_attention" not in config["layer_types"]:
        windows = []  # Qwen2 / Qwen3 with use_sliding_window off: every layer attends fully
    return min([context] + [w for w in windows if w])


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's half-split rotary layout -> llama.cpp's pairwise layout (rows of q or k, per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_parameters(config: dict) -> dict:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def _rope_freqs(rope: dict, head_dim: int) -> torch.Tensor:
    """Llama 3's per-frequency rope factors, as llama.cpp's ``rope_freqs`` tensor expects them."""
    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    factors = torch.where(wavelen < old / high, torch.ones_like(freqs),
                          torch.where(wavelen > old / low, torch.full_like(freqs, factor),
                                      1 / ((1 - smooth) / factor + smooth)))
    return factors.float()


NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def _gguf_tensors(config: dict, layout: _Layout, tensors: dict[str, _Tensor]) -> list[tuple[str, _Tensor]]:
    """(GGUF name, tensor) in file order; q/k permuted, zero blocks filled in."""
    if layout.arch in OWN_ARCHITECTURES.values():
        return _own_tensors(config, layout, tensors)
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    tied = "lm_head.weight" not in tensors or config.get("tie_word_embeddings", False)
    out = [("token_embd.weight", tensors["model.embed_tokens.weight"])]
    rope = _rope_parameters(config)
    if rope.get("rope_type") == "llama3":
        out.append(("rope_freqs.weight", _Tensor((head_dim // 2,), lambda: _rope_freqs(rope, head_dim))))
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if i in layout.zero_attention:  # one KV group whose output projection is zero: adds exactly nothing
            q, kv = layout.heads[i] * head_dim, layout.kv_heads[i] * head_dim
            mine.update({"input_layernorm.weight": _Tensor.filled((hidden,), 1),
                         "self_attn.q_proj.weight": _Tensor.filled((q, hidden), 0),
                         "self_attn.k_proj.weight": _Tensor.filled((kv, hidden), 0),
                         "self_attn.v_proj.weight": _Tensor.filled((kv, hidden), 0),
                         "self_attn.o_proj.weight": _Tensor.filled((hidden, q), 0)})
        if i in layout.zero_mlp:  # an MLP whose projections are zero: adds exactly nothing
            w = ZERO_MLP_WIDTH
            mine.update({"post_attention_layernorm.weight": _Tensor.filled((hidden,), 1),
                         "mlp.gate_proj.weight": _Tensor.filled((w, hidden), 0),
                         "mlp.up_proj.weight": _Tensor.filled((w, hidden), 0),
                         "mlp.down_proj.weight": _Tensor.filled((hidden, w), 0)})
        for key in sorted(mine):
            module, _, kind = key.rpartition(".")
            name = NAMES.get(key) or (NAMES.get(module) and f"{NAMES[module]}.{kind}")
            if not name:
                raise GGUFExportError(f"tensor {prefix + key} has no llama.cpp counterpart; this checkpoint is not a "
                                      f"plain Llama layer")
            tensor = mine[key]
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                n_head = layout.heads[i] if module == "self_attn.q_proj" else layout.kv_heads[i]
                tensor = tensor.map(lambda w, n=n_head: _permute(w, n))
            out.append((f"blk.{i}.{name}", tensor))
    out.append(("output_norm.weight", tensors["model.norm.weight"]))
    if not tied:
        out.append(("output.weight", tensors["lm_head.weight"]))
    return out


def _own_tensors(config: dict, layout: _Layout, tensors: dict[str, _Tensor]) -> list[tuple[str, _Tensor]]:
    """(GGUF name, tensor) for llama.cpp's own architecture ``layout.arch`` (qwen3, gemma3), named as gguf-py names
    them; Gemma's norms, which scale by 1 + weight, stored as 1 + weight (llama.cpp scales by the weight)."""
    import gguf

    arch = next(a for a in gguf.MODEL_ARCH if gguf.MODEL_ARCH_NAMES[a] == layout.arch)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    tied = "lm_head.weight" not in tensors or config.get("tie_word_embeddings", False)
    out = []
    for key, tensor in tensors.items():
        if key == "lm_head.weight" and tied:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"tensor {key} has no counterpart in llama.cpp's {layout.arch} architecture")
        if layout.arch == "gemma3" and key.endswith("norm.weight"):
            tensor = tensor.map(lambda w: w + 1)
        out.append((name, tensor))
    return out  # (llama.cpp finds tensors by name: the order is the checkpoint's)


# --------------------------------------------------------------------------------------------------------------------
# metadata and tokenizer


def _add_model_metadata(writer, config: dict, layout: _Layout, name: str, file_type: int) -> None:
    import gguf

    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    per_layer = layout.arch == "deci"
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(layout.ffn if per_layer else layout.ffn[0])
    writer.add_head_count(layout.heads if per_layer else layout.heads[0])
    writer.add_head_count_kv(layout.kv_heads if per_layer else layout.kv_heads[0])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    rope = _rope_parameters(config)
    if layout.arch == "gemma3":  # a rope per attention type
        local, rope = rope.get("sliding_attention", {}), dict(rope.get("full_attention", rope))
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
        writer.add_sliding_window(config["sliding_window"])
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):
        raise GGUFExportError(f"rope scaling {kind!r} is not written to GGUF by dms-llm (default, linear and llama3 "
                              f"are)")


def _copy_tokenizer(writer, source: Path, vocab_size: int) -> None:
    """Every ``tokenizer.*`` key of the GGUF ``source``, as it is there."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        raise GGUFExportError(f"{source} holds no tokenizer of {vocab_size} tokens; it is not this model's source")
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = f.types[0]
        if main == GGUFValueType.ARRAY:
            sub = f.types[-1]
            value = [bytes(f.parts[i]) for i in f.data] if sub == GGUFValueType.STRING else f.contents()
            writer.add_key_value(key, value, main, sub_type=sub)
        elif main == GGUFValueType.STRING:
            writer.add_key_value(key, bytes(f.parts[f.data[0]]), main)
        else:
            writer.add_key_value(key, f.contents(), main)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_name(spec: dict | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer of tokenizer.json, or None when it knows none."""
    if not spec:
        return None
    steps = spec["pretokenizers"] if spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def _build_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The GGUF tokenizer of a Hugging Face byte-level BPE tokenizer; GGUFExportError for any other kind."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; dms-llm builds "
                              f"GGUF tokenizers from tokenizer.json only. Pass the model's own GGUF as "
                              f"`tokenizer_gguf`.")
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel" or pre is None \
            or spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise GGUFExportError(
            f"the tokenizer ({model.get('type')} model, pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]}) "
            f"is not a byte-level BPE tokenizer that llama.cpp reproduces exactly; no GGUF was written. Pass a GGUF of "
            f"the base model as `tokenizer_gguf` to copy its tokenizer.")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())}, the model only {vocab_size} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for what in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{what}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{what}_token_id")(token_id)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def source_gguf(info: dict) -> Path | None:
    """The GGUF file an export's base model was loaded from (the embedded default or a ``.gguf`` path), if any."""
    from .loading import ModelLoadError, resolve_source

    base = info.get("base_model")
    if not base:
        return None
    try:
        target, gguf_file, _ = resolve_source(base)
    except ModelLoadError:
        return None
    return Path(target) / gguf_file if gguf_file else None


# --------------------------------------------------------------------------------------------------------------------
# writing


def _write_float_gguf(path: Path, config: dict, layout: _Layout, tensors: dict, name: str, dtype: str,
                      tokenizer_source, tokenizer) -> str:
    """Stream the f32 / f16 GGUF to ``path`` (one tensor in memory at a time); returns where the tokenizer came from."""
    import gguf

    writer = gguf.GGUFWriter(str(path), layout.arch)
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    _add_model_metadata(writer, config, layout, name, int(file_type))
    if tokenizer_source is not None:
        _copy_tokenizer(writer, tokenizer_source, config["vocab_size"])
        origin = f"copied from {tokenizer_source.name}"
    else:
        _build_tokenizer(writer, tokenizer, config["vocab_size"])
        origin = "built from the Hugging Face tokenizer"
    entries = [(n, t, np.dtype(np.float32 if len(t.shape) == 1 or dtype == "f32" else np.float16))
               for n, t in _gguf_tensors(config, layout, tensors)]
    for gguf_name, t, np_dtype in entries:  # the header first (shapes only), then one tensor at a time
        writer.add_tensor_info(gguf_name, list(t.shape), np_dtype, math.prod(t.shape) * np_dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, t, np_dtype in entries:
        writer.write_tensor_data(t.read().numpy().astype(np_dtype))
    writer.close()
    return origin


@contextlib.contextmanager
def _native_log(path: Path):
    """Send what native code writes to stderr (llama.cpp logs a line per tensor) to ``path`` instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _quantize(src: Path, dst: Path, gguf_type: str, threads: int) -> None:
    """llama.cpp's own quantizer: ``src`` (an f32 GGUF) -> ``dst`` of ``gguf_type``."""
    llama_cpp = _require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{GGUF_TYPES[gguf_type]}")
    params.nthread = threads
    log = dst.with_name(dst.name + ".log")
    try:
        with _native_log(log):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            tail = log.read_text(errors="replace")[-1500:]
            raise GGUFExportError(f"llama.cpp's quantizer failed on {gguf_type} (return code {rc}):\n{tail}")
    finally:
        log.unlink(missing_ok=True)


def _fallbacks(path: Path, gguf_type: str) -> list[dict]:
    """The 2-D tensors of ``path`` whose rows are not a multiple of 32 (llama.cpp stored them in f16/f32)."""
    if gguf_type in FLOAT_TYPES:
        return []
    from gguf import GGUFReader

    out = []
    for t in GGUFReader(str(path)).tensors:
        if len(t.shape) == 2 and int(t.shape[0]) % QUANT_ROW_MULTIPLE:
            out.append({"tensor": t.name, "row": int(t.shape[0]), "type": t.tensor_type.name, "bytes": int(t.n_bytes)})
    return out


def _estimate_bytes(tensors: dict[str, _Tensor], gguf_type: str) -> int:
    """Disk the write needs at its peak: the file itself, plus the f32 file llama.cpp quantizes from."""
    params = sum(math.prod(t.shape) for t in tensors.values())
    if gguf_type == "f32":
        return 4 * params
    return 2 * params if gguf_type == "f16" else 6 * params


def _check_output(out: Path, source: Path, overwrite: bool) -> Path:
    out = Path(out).expanduser().resolve()
    if out.suffix != ".gguf":
        raise DMSError(f"`out={out}` must end in .gguf")
    if source == out.parent or source in out.parents:
        raise DMSError(f"refusing to write {out} into the input folder {source}; choose an `out` outside it")
    if out.exists() and not overwrite:
        raise DMSError(f"{out} exists; pass `overwrite=True` to replace it")
    if out.exists() and not out.is_file():
        raise DMSError(f"{out} exists and is not a file; choose another `out`")
    check_writable_parent(out, "out")
    return out


def default_gguf_path(folder: str | Path, gguf_type: str) -> Path:
    """Where a folder's GGUF goes unless told: ``<folder>-<type>.gguf`` beside it (the folder itself is not
    changed)."""
    folder = Path(folder).expanduser().resolve()
    return folder.with_name(f"{folder.name}-{gguf_type}.gguf")


def check_gguf_output(folder: str | Path, gguf_type: str, overwrite: bool) -> Path:
    """What a prune / finetune with ``gguf`` checks before it loads a model: the type, the tools, the target file."""
    gguf_type = check_gguf_type(gguf_type, "gguf")
    _require_tools()
    out = default_gguf_path(folder, gguf_type)
    return _check_output(out, Path(folder).expanduser().resolve(), overwrite)


def _require_tools():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("writing GGUF files needs the gguf package: pip install 'dms-llm[llamacpp]'") from None
    _require_llama_cpp()


def write_gguf(
    folder: str | Path,
    out: str | Path | None = None,
    gguf_type: str = "f16",
    overwrite: bool = False,
    tokenizer_gguf: str | Path | None = None,
    threads: int | None = None,
) -> GGUFResult:
    """Write the checkpoint in ``folder`` (a dms-llm export, per-layer or uniform, or a Hugging Face Llama folder) as
    a GGUF file ``out`` (default: ``<folder>-<type>.gguf`` beside it) of ``gguf_type``, checked by llama.cpp before
    it is moved into place. ``tokenizer_gguf``: a GGUF (or ``"smollm2-135m"``) whose tokenizer to copy; by default
    the export's source GGUF when it came from one, else the tokenizer is built from the folder's."""
    gguf_type = check_gguf_type(gguf_type)
    _require_tools()
    folder = Path(folder).expanduser().resolve()
    config, info = _read_folder(folder)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise DMSError(f"{folder} holds no tokenizer (tokenizer.json); the GGUF carries one and its check compares "
                       f"tokenizations: save it beside the model (tokenizer.save_pretrained(folder)) and run again")
    out = _check_output(Path(out) if out else default_gguf_path(folder, gguf_type), folder, overwrite)
    layout = _layout(config)
    tensors = _tensors(folder)
    if tokenizer_gguf is not None:
        tokenizer_source = source_gguf({"base_model": str(tokenizer_gguf)})
        if tokenizer_source is None:
            raise DMSError(f"`tokenizer_gguf={tokenizer_gguf}` is not a .gguf file (or the embedded 'smollm2-135m')")
    else:
        tokenizer_source = source_gguf(info)
    out.parent.mkdir(parents=True, exist_ok=True)
    need = _estimate_bytes(tensors, gguf_type)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise GGUFExportError(f"writing {out.name} needs about {need / 2**30:.1f} GiB in {out.parent}, "
                              f"{free / 2**30:.1f} GiB are free; free disk space or choose another `out`")
    tokenizer = _hf_tokenizer(folder, config)
    threads = threads or max(1, os.cpu_count() or 1)
    for stale in out.parent.glob(f".{out.stem}.tmp-*"):  # left by a write that was killed
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.tmp-", suffix=".gguf", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    f32 = tmp.with_name(tmp.name.replace(".gguf", ".f32.gguf"))
    name = info.get("base_model") or config.get("_name_or_path") or folder.name
    name = f"{Path(str(name)).name} dms-llm" if info else Path(str(name)).name
    try:
        direct = gguf_type in ("f32", "f16")
        origin = _write_float_gguf(tmp if direct else f32, config, layout, tensors, name,
                                   gguf_type if direct else "f32", tokenizer_source, tokenizer)
        if not direct:
            _quantize(f32, tmp, gguf_type, threads)
            f32.unlink()
        check = check_gguf(tmp, folder, config, tokenizer, gguf_type, threads,
                           max_tokens=min(128, context_length(config)))
        fallbacks = _fallbacks(tmp, gguf_type)
        os.replace(tmp, out)
    except OSError as e:
        raise GGUFExportError(f"could not write {out} ({e.strerror or e}); free disk space or choose another `out`. "
                              f"Nothing was left behind.") from e
    finally:
        tmp.unlink(missing_ok=True)
        f32.unlink(missing_ok=True)
    result = GGUFResult(out, gguf_type, layout.arch, out.stat().st_size, origin, check, fallbacks)
    if fallbacks:
        logger.warning("%d tensor(s) of %s have rows that are not a multiple of %d and were not quantized to %s "
                       "(%.1f MiB): %s. Prune with `channel_multiple=32` (what `dms-llm prune --gguf <quantized "
                       "type>` does) to avoid it.", len(fallbacks), out.name, QUANT_ROW_MULTIPLE, gguf_type,
                       sum(f["bytes"] for f in fallbacks) / 2**20, ", ".join(f["tensor"] for f in fallbacks[:6]))
    logger.info("wrote %s (%s, %s, %.1f MiB; tokenizer %s); llama.cpp check: %s", out, layout.arch, gguf_type,
                result.bytes / 2**20, origin, check)
    return result


# --------------------------------------------------------------------------------------------------------------------
# the check


def _hf_config(folder: Path, config: dict):
    """The folder's config, read with dms-llm's own config class for per-layer exports (the folder's code is not
    run)."""
    from transformers import AutoConfig

    if config["model_type"] == "dms_llama":
        from .modeling.configuration_dms_llama import DMSLlamaConfig

        return DMSLlamaConfig.from_pretrained(folder)
    return AutoConfig.from_pretrained(folder)


def _hf_tokenizer(folder: Path, config: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, config=_hf_config(folder, config))


def _hf_model(folder: Path, config: dict):
    """The folder's model in fp32, from dms-llm's own model code for per-layer exports (the folder's code is not
    run)."""
    from transformers import AutoModelForCausalLM

    if config["model_type"] == "dms_llama":
        from .modeling.modeling_dms_llama import DMSLlamaForCausalLM

        return DMSLlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def llama_cpp_has_amx() -> bool:
    """Whether this llama.cpp build runs matrix products on Intel AMX (it says ``AMX_INT8 = 1``)."""
    return b"AMX_INT8 = 1" in _require_llama_cpp().llama_print_system_info()


@contextlib.contextmanager
def _weight_repacking(enabled: bool):
    """llama-cpp-python's ``Llama`` takes no ``use_extra_bufts``; it reads llama.cpp's default model parameters, so
    those are wrapped while a model loads (``-nr`` / ``--no-repack`` in llama.cpp's own tools)."""
    bindings = _require_llama_cpp().llama_cpp
    default = bindings.llama_model_default_params
    if enabled or not hasattr(default(), "use_extra_bufts"):
        yield
        return

    def without_repacking():
        params = default()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_repacking
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


def open_llama(path: Path, n_ctx: int, threads: int, logits_all: bool = True, f32_cache: bool = True,
               repack: bool | None = None):
    """llama.cpp's model for ``path``; ``f32_cache``: an f32 KV cache, so a check sees the weights' precision alone
    (otherwise llama.cpp's default, f16, as users run it). ``repack`` (default: off where llama.cpp has AMX):
    llama.cpp's weight repacking for its CPU kernels. Its AMX path segfaults on the first forward in the llama.cpp
    that llama-cpp-python 0.3.36 vendors, for stock GGUFs too (the embedded SmolLM2 Q4_1; llama.cpp issue #20824),
    so on those CPUs the check runs llama.cpp's plain CPU kernels (docs/DESIGN.md §8)."""
    llama_cpp = _require_llama_cpp()
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    with _weight_repacking(not llama_cpp_has_amx() if repack is None else repack):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                               logits_all=logits_all, verbose=False, seed=0, **cache)


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits at every position of ``ids`` (a fresh context)."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def llama_cpp_perplexity(path: str | Path, tokens: torch.Tensor, seq_len: int = 2048, max_windows: int | None = None,
                         threads: int | None = None) -> dict:
    """Perplexity of the GGUF ``path`` in llama.cpp on ``tokens`` (already tokenized), scored exactly as
    :func:`dms_llm.perplexity` scores a Hugging Face model: non-overlapping windows of ``seq_len``, each predicting
    its tokens 2..n."""
    import time

    n = len(tokens) // seq_len if max_windows is None else min(max_windows, len(tokens) // seq_len)
    llm = open_llama(Path(path), n_ctx=seq_len, threads=threads or os.cpu_count() or 1)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    try:
        for i in range(n):
            ids = tokens[i * seq_len:(i + 1) * seq_len].tolist()
            nll += _nll(llama_logits(llm, ids), ids) * (len(ids) - 1)
            count += len(ids) - 1
    finally:
        llm.close()
    return {"ppl": math.exp(nll / count), "windows": n, "seq_len": seq_len, "seconds": time.perf_counter() - t0}


def llama_cpp_speed(path: str | Path, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 5,
                    threads: int | None = None, seed: int = 0) -> dict:
    """Prefill and cached-decode tokens/s of the GGUF ``path`` in llama.cpp at batch 1 with its default (f16) KV
    cache (``dms_llm.evaluation.speed``'s protocol: a random prompt, greedy steps of one token, best of ``repeats``
    after a warm-up)."""
    import time

    llm = open_llama(Path(path), n_ctx=prompt_len + new_tokens + 8, threads=threads or os.cpu_count() or 1,
                     logits_all=False, f32_cache=False)
    vocab = llm.n_vocab()
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    best_prefill = best_decode = float("inf")
    try:
        for run in range(repeats + 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            t2 = time.perf_counter()
            if run > 0:
                best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
    finally:
        llm.close()
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "threads": threads,
            "prefill_tokens_per_s": prompt_len / best_prefill, "decode_tokens_per_s": new_tokens / best_decode,
            "file_bytes": Path(path).stat().st_size}


def _nll(logits: torch.Tensor, ids: list[int]) -> float:
    target = torch.tensor(ids[1:])
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), target))


def check_gguf(path: Path, folder: Path, config: dict, tokenizer, gguf_type: str, threads: int,
               text: str = CHECK_TEXT, max_tokens: int = 128) -> dict:
    """llama.cpp loads ``path``, must tokenize ``text`` as ``tokenizer`` does and reproduce the folder's logits on it:
    max abs difference within ``LOGIT_TOLERANCE`` (float types) or perplexity within ``QUANT_PPL_BOUND`` of the
    Hugging Face model's (quantized types). GGUFExportError otherwise."""
    hf_ids = tokenizer(text, add_special_tokens=False).input_ids
    repack = not llama_cpp_has_amx()
    try:
        llm = open_llama(path, n_ctx=max_tokens + 16, threads=threads, repack=repack)
    except Exception as e:
        raise GGUFExportError(f"llama.cpp could not load the GGUF it was given ({e}); nothing was written") from None
    try:
        cpp_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        if cpp_ids != hf_ids:
            first = next((i for i, (a, b) in enumerate(zip(cpp_ids, hf_ids)) if a != b), min(len(cpp_ids), len(hf_ids)))
            raise GGUFExportError(
                f"llama.cpp tokenizes the check text differently from the model's tokenizer (first difference at "
                f"token {first}: {cpp_ids[first:first + 4]} vs {hf_ids[first:first + 4]}); no GGUF was written. Pass "
                f"the base model's GGUF as `tokenizer_gguf`, or report the tokenizer.")
        bos = tokenizer.bos_token_id
        ids = ([bos] if bos is not None else []) + hf_ids
        ids = ids[:max_tokens]
        got = llama_logits(llm, ids)
    finally:
        llm.close()
    model = _hf_model(folder, config)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].float()
    diff = float((got - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()) / 10)
    ppl_hf, ppl_cpp = math.exp(_nll(expected, ids)), math.exp(_nll(got, ids))
    same_top = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    check = {"tokens": len(ids), "tokenization": "identical", "max_abs_logit_diff": round(diff, 6),
             "ppl_hf": round(ppl_hf, 4), "ppl_llama_cpp": round(ppl_cpp, 4), "same_argmax": round(same_top, 4),
             "weight_repacking": repack}
    if gguf_type in LOGIT_TOLERANCE:
        bound = LOGIT_TOLERANCE[gguf_type] * scale
        check["bound"] = f"max abs logit diff <= {bound:.3g}"
        if not diff <= bound:
            raise GGUFExportError(f"llama.cpp's logits on the {gguf_type} GGUF differ from the model's by {diff:.3g} > "
                                  f"{bound:.3g}; no GGUF was written. Please report this with dms_structure.json.")
    else:
        bound = QUANT_PPL_BOUND[gguf_type]
        check["bound"] = f"perplexity <= {bound}x the model's on the check text"
        if not ppl_cpp <= bound * ppl_hf:
            raise GGUFExportError(f"the {gguf_type} GGUF's perplexity on the check text is {ppl_cpp:.2f}, more than "
                                  f"{bound}x the model's {ppl_hf:.2f}; no GGUF was written. Choose a type with more "
                                  f"bits.")
    return check


__all__ = ["CHECK_TEXT", "GGUFExportError", "GGUFResult", "GGUF_TYPES", "channel_multiple_for", "check_gguf",
           "check_gguf_type", "check_per_layer_gguf", "llama_cpp_has_amx", "llama_cpp_perplexity", "llama_cpp_speed",
           "llama_logits", "open_llama", "source_gguf", "write_gguf"]
