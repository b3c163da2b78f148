"""Helpers shared by the benchmark scripts (imported as a sibling module: run the scripts as files)."""

import platform
from pathlib import Path

import torch


def machine_name(device: str) -> str:
    """The device the numbers come from, as written next to them."""
    name = torch.cuda.get_device_name() if device == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}"


def eval_windows(arg: int | None, device: str) -> int | None:
    """How many 2048-token evaluation windows to score: the argument, else 8 on CPU and all on a GPU (0 = all)."""
    windows = arg if arg is not None else (None if device == "cuda" else 8)
    return windows or None


def replace_section(markdown: str | Path, start: str, end: str, lines: list[str]) -> Path:
    """Put ``lines`` (which begin with ``start`` and end with ``end``) in place of that marked section of the file,
    or append them when the file has no such section yet."""
    md = Path(markdown)
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + "\n".join(lines) + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    md.write_text(text)
    return md
