"""Text for calibration and evaluation: Hub datasets by name, local files and folders, and a built-in corpus.

Sources (``--calib`` / ``--eval-data``):
- ``pydoc`` / ``pydoc-heldout``: the English documentation topics that ship with every CPython
  (``pydoc_data.topics``), split by topic into a calibration part (first 80%) and a held-out part (last 20%).
  Works on any machine with no network; the embedded default uses it.
- ``wikitext2`` (calibration: train split, evaluation: test split), ``ptb``, ``c4``: Hugging Face Hub datasets,
  loaded with ``datasets`` (C4 streamed, only the documents needed are read).
- a local ``.txt`` / ``.raw`` / ``.tokens`` file (read as text with universal newlines), a ``.jsonl`` / ``.json``
  file (the ``text`` field of every record), or a folder of such files (sorted by name).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import DMSError

TEXT_SUFFIXES = {".txt", ".raw", ".tokens", ".text", ".md"}
JSON_SUFFIXES = {".jsonl", ".json"}
BUILTIN = ("pydoc", "pydoc-heldout")


class HubDataset(NamedTuple):
    """A public dataset dms-llm knows by name: where it lives on the Hub and how its text is read."""

    hub_id: str
    config: str | None
    name: str  # as people call it
    text_field: str
    joiner: str  # between rows
    data_files: dict | None = None  # {split: file}: only these files are read (streamed)


# the one registry of named data sources: loading reads them, the model card cites them
DATASETS = {
    "wikitext2": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "WikiText-2", "text", "\n\n"),
    "ptb": HubDataset("ptb-text-only/ptb_text_only", "penn_treebank", "Penn Treebank", "sentence", " "),
    "c4": HubDataset("allenai/c4", None, "C4", "text", "\n\n", {"train": "en/c4-train.00000-of-01024.json.gz",
                                                               "test": "en/c4-validation.00000-of-00008.json.gz"}),
}
ALIASES = {"wikitext": "wikitext2", "wikitext-2-raw-v1": "wikitext2"}
_WIKITEXT_FILE = re.compile(r"^wiki\.(train|valid|test)\.(raw|tokens)$")  # the WikiText-2 distribution's file names


class DataError(DMSError, ValueError):
    """Calibration or evaluation data that cannot be used."""


def dataset_of(source: str | None) -> HubDataset | None:
    """The public dataset a calibration / evaluation source is, when known (by name or by WikiText-2's file names)."""
    if not source:
        return None
    key = ALIASES.get(str(source).lower(), str(source).lower())
    if key in DATASETS:
        return DATASETS[key]
    if _WIKITEXT_FILE.match(Path(str(source)).name):
        return DATASETS["wikitext2"]
    return None


def _pydoc_text(part: str) -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = int(len(keys) * 0.8)
    chosen = keys[:cut] if part == "pydoc" else keys[cut:]
    return "\n\n".join(topics[k] for k in chosen)


def _read_text_file(path: Path, max_chars: int | None = None) -> str:
    """The text of a UTF-8 file, read only up to ``max_chars`` characters (big corpora are never read whole)."""
    with open(path, "rb") as f:
        if b"\x00" in f.read(65536):
            raise DataError(f"{path} looks binary (it contains NUL bytes); give a UTF-8 text or JSONL file")
    try:
        with open(path, encoding="utf-8", newline=None) as f:  # universal newlines
            return f.read(max_chars if max_chars else -1)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8 or give another file") from None


def _records(path: Path):
    """(line number, parsed record) of a JSONL file, streamed; a ``.json`` array is parsed whole."""
    if path.suffix == ".json":
        content = _read_text_file(path)
        if content.lstrip().startswith("["):
            yield from enumerate(json.loads(content), 1)
            return
        lines = content.splitlines()
    else:
        _read_text_file(path, 65536)  # the binary / encoding checks, on the first block
        lines = open(path, encoding="utf-8")
    try:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8 or give another file") from None
    finally:
        if hasattr(lines, "close"):
            lines.close()


def _read_jsonl(path: Path, max_chars: int | None) -> str:
    texts, total = [], 0
    for n, record in _records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}: record {n} has no string field "text"; JSONL data needs {{"text": ...}} per line')
        texts.append(record["text"])
        total += len(record["text"])
        if max_chars and total >= max_chars:
            break
    return "\n\n".join(texts)


def _hub_text(dataset: HubDataset, split: str, max_chars: int | None) -> str:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError("loading Hub datasets needs the 'datasets' package: pip install datasets") from None
    try:
        if dataset.data_files is None:
            rows = datasets.load_dataset(dataset.hub_id, dataset.config, split=split)[dataset.text_field]
            return dataset.joiner.join(rows)
        files = {split: dataset.data_files[split]}  # a big corpus: one shard, streamed, read only as far as needed
        stream = datasets.load_dataset(dataset.hub_id, data_files=files, split=split, streaming=True)
        texts, total = [], 0
        for record in stream:
            texts.append(record[dataset.text_field])
            total += len(texts[-1])
            if total >= (max_chars or 20_000_000):
                break
        return dataset.joiner.join(texts)
    except Exception as e:  # network or Hub errors: say what to do instead
        raise DataError(
            f"could not load the Hub dataset {dataset.hub_id!r} ({type(e).__name__}: {e}). Without Hub access give a "
            f"local text/JSONL file or folder instead (e.g. WikiText-2's wiki.valid.tokens), or 'pydoc'."
        ) from None


def _read_file(path: Path, max_chars: int | None) -> str:
    """One local file: the ``text`` fields of a JSONL / JSON file, or the text of any other file."""
    return _read_jsonl(path, max_chars) if path.suffix in JSON_SUFFIXES else _read_text_file(path, max_chars)


def load_text(source: str | Path, split: str = "train", max_chars: int | None = None) -> str:
    """The raw text of ``source`` (see the module docstring). ``split`` picks the Hub split ("train"/"test")."""
    src = str(source)
    if src in BUILTIN:
        text = _pydoc_text(src)
    elif Path(src).exists():
        path = Path(src)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | JSON_SUFFIXES)
            if not files:
                raise DataError(f"folder {path} holds no .txt/.raw/.tokens/.jsonl/.json files")
            parts, total = [], 0
            for file in files:  # stop reading once enough text is in hand
                parts.append(_read_file(file, max_chars))
                total += len(parts[-1])
                if max_chars and total >= max_chars:
                    break
            text = "\n\n".join(parts)
        else:
            text = _read_file(path, max_chars)
    elif dataset_of(src) is not None and not Path(src).suffix:
        text = _hub_text(dataset_of(src), split, max_chars)
    else:
        raise DataError(
            f"data source {src!r} is neither an existing file or folder nor a known dataset name "
            f"({', '.join(sorted(set(DATASETS) | set(ALIASES) | set(BUILTIN)))})"
        )
    if max_chars:
        text = text[:max_chars]
    if not text.strip():
        raise DataError(f"data source {src!r} is empty")
    return text


def check_source(source: str | Path) -> None:
    """Stop early, before any model loads, on a data source that cannot work: a missing path, an unknown name, an
    empty, binary, non-UTF-8 or malformed file. Reads at most the first 64K characters; never the network (a Hub
    dataset name is accepted here and fetched when used)."""
    src = str(source)
    if src in BUILTIN or (not Path(src).exists() and dataset_of(src) is not None and not Path(src).suffix):
        return
    load_text(src, max_chars=65_536)


def tokenize_text(tokenizer, text: str, chunk_chars: int = 1_000_000) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D tensor, tokenized in chunks cut at paragraph boundaries."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        ids = tokenizer(text[start:end], add_special_tokens=(start == 0)).input_ids
        pieces.append(torch.tensor(ids, dtype=torch.long))
        start = end
    return torch.cat(pieces)


def _window_order(tokenizer, source: str | Path, seq_len: int, num_samples: int, seed: int):
    """(token ids, the text's window indices in the seed's random order) — one order, so the calibration windows and
    the held-out ones after them never overlap."""
    if seq_len < 2 or num_samples < 1:
        raise DataError(f"need seq_len >= 2 and num_samples >= 1, got {seq_len} and {num_samples}")
    # read only as much text as could be needed (about 6 characters a token, with a wide margin)
    text = load_text(source, split="train", max_chars=max(2_000_000, 40 * seq_len * num_samples))
    ids = tokenize_text(tokenizer, text)
    g = torch.Generator().manual_seed(seed)
    return ids, torch.randperm(len(ids) // seq_len, generator=g)


def _windows(ids: torch.Tensor, order: torch.Tensor, seq_len: int) -> torch.Tensor:
    return torch.stack([ids[i * seq_len : (i + 1) * seq_len] for i in order.sort().values.tolist()])


def calibration_windows(
    tokenizer, source: str | Path, seq_len: int, num_samples: int, seed: int = 0, allow_fewer: bool = False
) -> torch.Tensor:
    """``num_samples`` non-overlapping windows of ``seq_len`` tokens drawn at random (by ``seed``) from ``source``
    (with ``allow_fewer``, as many as the text holds when that is fewer, but at least one).

    Returns a (num_samples, seq_len) int64 tensor."""
    ids, order = _window_order(tokenizer, source, seq_len, num_samples, seed)
    available = len(order)
    if allow_fewer and available >= 1:
        num_samples = min(num_samples, available)
    if available < num_samples:
        raise DataError(
            f"calibration data {str(source)!r} has {len(ids)} tokens: enough for {available} windows of {seq_len}, "
            f"not {num_samples}. Lower --num-samples or --seq-len, or give more text."
        )
    return _windows(ids, order[:num_samples], seq_len)


def held_out_windows(tokenizer, source: str | Path, seq_len: int, num_samples: int, count: int, seed: int = 0,
                     length: int | None = None) -> torch.Tensor | None:
    """Up to ``count`` windows of ``length`` tokens (default ``seq_len``) of ``source`` that share no token with the
    windows :func:`calibration_windows` returns for the same ``seq_len``, ``num_samples`` and ``seed`` (drawn at
    random, by ``seed``), or None when the text holds none. The calibration windows do not depend on them."""
    length = length or seq_len
    ids, order = _window_order(tokenizer, source, seq_len, num_samples, seed)
    if count < 1 or length < 2:
        return None
    taken = torch.zeros(len(ids) + length, dtype=torch.bool)
    for i in order[:num_samples].tolist():
        taken[i * seq_len: (i + 1) * seq_len] = True
    g = torch.Generator().manual_seed(seed + 1)
    free = [j for j in torch.randperm(len(ids) // length, generator=g).tolist()
            if not taken[j * length: (j + 1) * length].any()][:count]
    return _windows(ids, torch.tensor(free), length) if free else None


def evaluation_tokens(tokenizer, source: str | Path) -> torch.Tensor:
    """All token ids of an evaluation source (Hub names use the test split)."""
    return tokenize_text(tokenizer, load_text(source, split="test"))
