"""Everything that reads or writes an output folder (docs/DESIGN.md §4): where it may go, how it is written
(a temporary folder beside the target, reloaded and compared with the model in memory, then renamed into place),
its record ``dms_structure.json``, its model card and plot, and the resumable state files kept beside it.

A folder is never written in place: a kill or a failed check leaves the old output (or nothing) behind."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import DMSError
from .structure import Structure

logger = logging.getLogger("dms_llm")

STRUCTURE_FILE = "dms_structure.json"


class ExportError(DMSError, RuntimeError):
    """The output could not be written, or did not reproduce the model in memory."""


def check_output_dir(out_dir: str | Path, source_dir: str | Path | None, overwrite: bool) -> Path:
    """Refuse outputs that would overwrite the source or existing work; return the resolved target."""
    out = Path(out_dir).expanduser().resolve()
    if source_dir is not None:
        src = Path(source_dir).resolve()
        if out == src or src in out.parents:  # (a .gguf source is a file: only `out == src` can hit it)
            what = "source folder" if src.is_dir() else "source file"
            raise ExportError(f"refusing to write into the {what} {src}; choose another `out_dir`")
        if out in src.parents:
            raise ExportError(f"refusing to write to {out}, which contains the source model {src}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another `out_dir`")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass `overwrite=True` to replace it")
    check_writable_parent(out, "out_dir")
    return out


def check_writable_parent(out: Path, setting: str) -> None:
    """ExportError naming ``setting`` unless the nearest existing folder above ``out`` can be written to."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {parent} (read-only or no permission); choose a writable `{setting}`")


def state_path(out: Path, kind: str) -> Path:
    """Where the resumable state of a ``kind`` ("search", "recovery") run writing ``out`` is kept: a hidden file
    beside the output folder, removed once the output is in place."""
    return out.parent / f".{out.name}.{kind}-state.pt"


def announce_saved_state(path: Path, kind: str, resume: bool) -> None:
    """Say what happens to a saved state of an interrupted run: continued with ``resume``, otherwise replaced."""
    if not path.exists():
        if resume:
            logger.warning("no saved %s state at %s: starting from the beginning", kind, path)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        where = f"after step {state['step']}"
    except Exception:  # unreadable (e.g. written by another version): it will be replaced all the same
        where = "unreadable"
    if resume:
        logger.warning("resuming the interrupted %s from its saved state (%s, %s)", kind, where, path)
    else:
        logger.warning("found the saved state of an interrupted %s of this output (%s, %s). This run starts over and "
                       "replaces it when it saves its own; to continue the interrupted %s from there instead, stop "
                       "now and run again with `resume=True`", kind, where, path, kind)


def probe_ids(vocab_size: int, device) -> torch.Tensor:
    """Fixed random token ids on which a written checkpoint is compared with the model in memory."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, 48), generator=g).to(device)


def default_atol(model: nn.Module) -> float:
    """Largest max-abs logit difference accepted between a written checkpoint and the model in memory."""
    return 1e-3 if next(model.parameters()).dtype == torch.float32 else 1e-1


def slicing_atol(model: nn.Module) -> float:
    """Largest max-abs logit difference accepted between a sliced model and its source hard-masked to the same
    structure (for logits up to 10; :func:`check_same_logits` scales it with them): 10x :func:`default_atol`. Slicing
    instead of masking only reorders sums, but a badly damaged model amplifies that rounding: SmolLM2 at keep 0.5
    differed by 1.6e-5 to 3.5e-4 (scaled) for most methods' structures and by 1.2e-3 for FLAP's (perplexity 988) on an
    AVX-512 / AMX CPU; a wrong slice differs by ~1."""
    return 10 * default_atol(model)


@torch.no_grad()
def probe_logits(model: nn.Module) -> torch.Tensor:
    """The model's fp32 logits on :func:`probe_ids`."""
    probe = probe_ids(model.config.vocab_size, next(model.parameters()).device)
    return model(input_ids=probe, use_cache=False).logits.float()


def write_checkpoint(
    model: nn.Module,
    out: Path,
    structure: Structure,
    info: dict,
    tokenizer=None,
    atol: float | None = None,
    extra_files: dict[str, str] | None = None,
) -> float:
    """Save ``model`` with its tokenizer, ``dms_structure.json`` (``info`` + structure), the structure plot, a model
    card and ``extra_files`` into a temporary folder beside ``out``; reload it and check its logits against ``model``
    in memory; then move it into place. Returns the max abs logit difference."""
    atol = default_atol(model) if atol is None else atol
    reference = probe_logits(model)
    dtype = next(model.parameters()).dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / STRUCTURE_FILE).write_text(json.dumps({**info, "structure": structure.to_dict()}, indent=1))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _write_card(tmp, info)
        _write_plot(tmp, structure, info)
        diff = _verify(tmp, reference, not structure.is_uniform(), atol, dtype)
        _move_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(
            f"could not write beside {out} ({e.strerror or e}); free disk space or choose another `out_dir`. "
            f"Nothing was changed in {out}."
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s (%s), reloaded logits max abs diff %.2e", out, info.get("format"), diff)
    return diff


def check_same_logits(expected: torch.Tensor, got: torch.Tensor, atol: float, what: str) -> float:
    """Max abs difference of two logit tensors; ExportError when it exceeds ``atol`` — scaled up with the logits
    once they exceed 10 in magnitude, since fp32 sums over other shapes round relative to their size (a 30-layer
    model with logits near 34 differs by ~1e-3 between masked and sliced weights; a wrong slice differs by ~1)."""
    diff = (got.float() - expected.float()).abs().max().item()
    atol = atol * max(1.0, expected.float().abs().max().item() / 10)
    if not diff <= atol:
        raise ExportError(f"{what} differs from the model it should reproduce: max abs logit diff {diff:.3e} > "
                          f"{atol:.3g}. Nothing was written to the output folder; please report this with "
                          f"{STRUCTURE_FILE}.")
    return diff


def _verify(folder: Path, reference: torch.Tensor, remote_code: bool, atol: float, dtype) -> float:
    """Reload the written folder in the model's dtype and compare its logits with the model in memory."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote_code, dtype=dtype)
    reloaded.to(reference.device).eval()
    return check_same_logits(reference, probe_logits(reloaded), atol, "the reloaded checkpoint")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Atomic as far as the file system allows: the old folder is only removed once the new one is in place."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_atomic(path: Path, text: str) -> None:
    """Write a small file into a finished folder without ever leaving it half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_structure_file(folder: str | Path) -> dict:
    """The contents of an export's ``dms_structure.json`` (structure, sizes, how it was made, results)."""
    path = Path(folder) / STRUCTURE_FILE
    if not path.is_file():
        raise ExportError(f"{folder} has no {STRUCTURE_FILE}: it is not a dms-llm export")
    return json.loads(path.read_text())


def update_structure_file(folder: str | Path, **values) -> dict:
    """Add ``values`` to a finished export's ``dms_structure.json`` and re-render its model card, atomically."""
    info = {**load_structure_file(folder), **values}
    write_atomic(Path(folder) / STRUCTURE_FILE, json.dumps(info, indent=1))
    _write_card(Path(folder), info)
    return info


def save_recovered(
    model: nn.Module,
    out_dir: str | Path,
    source_dir: str | Path,
    tokenizer=None,
    recovery: dict | None = None,
    overwrite: bool = False,
    perplexity: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save a finetuned dms-llm export like the export itself: same format, ``dms_structure.json`` of the source
    plus a ``recovery`` record, model card, plot; written to a temporary folder, reloaded, checked against the
    model in memory, then moved into place. ``source_dir`` (the pruned input) is never modified."""
    info = load_structure_file(source_dir)
    structure = Structure.from_dict(info.pop("structure"))
    out = check_output_dir(out_dir, source_dir, overwrite)
    info["recovery"] = recovery or {}
    if perplexity:
        info["perplexity"] = {**(info.get("perplexity") or {}), **perplexity}
    info.setdefault("dense_query_heads", max(info["kept_query_heads"]))
    info.setdefault("dense_mlp_channels", max(info["kept_mlp_channels"]))
    write_checkpoint(model, out, structure, info, tokenizer=tokenizer, extra_files=extra_files)
    return out


def _write_card(folder: Path, info: dict) -> None:
    from .card import render_model_card

    write_atomic(folder / "README.md", render_model_card(info))


def _write_plot(folder: Path, structure: Structure, info: dict) -> None:
    from .plot import plot_structure

    try:
        plot_structure(structure, info["dense_query_heads"], info["dense_mlp_channels"], folder / "dms_structure.png",
                       title=f"{info['params_after'] / 1e6:.1f}M of {info['params_before'] / 1e6:.1f}M parameters")
    except ImportError:  # matplotlib is optional
        logger.warning("matplotlib is not installed: no dms_structure.png")


__all__ = ["ExportError", "check_output_dir", "load_structure_file", "probe_ids", "save_recovered", "state_path",
           "update_structure_file", "write_atomic", "write_checkpoint"]
