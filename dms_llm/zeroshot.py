"""Zero-shot accuracy through lm-eval (docs/DESIGN.md §5): lm-eval's stock tasks, online or from local files.

The seven tasks pruning papers report (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA) normally
download their data from the Hub. With ``data_dir`` (``--zeroshot-data``, or ``$DMS_LLM_ZEROSHOT_DATA``) they read a
local folder instead, laid out as ``DIR/<task>/<split>.jsonl[.gz]`` with the Hub dataset's fields. Nothing of the
stock task is copied: for each task we write a three-line YAML that ``include``s lm-eval's own task file and replaces
only its data source (``dataset_path: json`` and the file of the split it scores), so the prompt, the choices, the
target, the metrics and any ``!function`` helpers are exactly lm-eval's. The same folder of YAML files serves the
plain ``lm_eval`` command (``--include_path``; :func:`write_local_tasks`).

Reported as LLM-Pruner and the DMS paper report them: acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm for
HellaSwag, ARC-c, OpenBookQA (acc for any other task that has it); their mean; lm-eval's standard errors.

Ranking models needs more than standard errors: two models scored on the same documents are compared *paired*.
:func:`zero_shot` keeps each document's score, and :func:`paired_difference` gives the difference of two models per
task and for the mean over tasks with a bootstrap interval that resamples documents (the same resample for both
models, each task resampled on its own, as the tasks' documents are independent). With ``cache`` a run keeps every
answer the model gave in lm-eval's request cache as it goes, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import DMSError

DEFAULT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
REPORTED_METRIC = {
    "boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
    "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
}
# the fields each stock task reads from a record of its Hub dataset
TASK_FIELDS = {
    "boolq": ("question", "passage", "label"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "arc_easy": ("question", "choices", "answerKey"),
    "arc_challenge": ("question", "choices", "answerKey"),
    "openbookqa": ("question_stem", "choices", "answerKey"),
}
# the split each stock task scores (lm-eval 0.4.13), i.e. the file the local folder must hold for it
SCORED_SPLIT = {"arc_easy": "test", "arc_challenge": "test", "openbookqa": "test", "boolq": "validation",
                "piqa": "validation", "hellaswag": "validation", "winogrande": "validation"}
DATA_ENV = "DMS_LLM_ZEROSHOT_DATA"
BUILTIN_TASKS = Path(__file__).parent / "tasks"
_DATA_FILE = re.compile(r"^(\s*[\w-]+:\s*)([^\s#'\"]+\.(?:jsonl|json|csv|parquet|txt))\s*$")


class TaskError(DMSError, ValueError):
    """An lm-eval task that cannot be found or run, or local task data that cannot be read."""


def expand(tasks) -> list[str]:
    """Task names, with ``default`` standing for the seven tasks of the table."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [t for name in names for t in (DEFAULT_TASKS if name == "default" else [name]) if t]


def data_dir_or_env(data_dir: str | Path | None) -> Path | None:
    """The local zero-shot data folder: the argument, else ``$DMS_LLM_ZEROSHOT_DATA``, else None (the Hub)."""
    value = data_dir or os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


@functools.lru_cache(maxsize=1)
def _stock_manager():
    """lm-eval's own task index (built once per process: it scans every task file)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _stock_entry(task: str):
    entry = _stock_manager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise TaskError(f"lm-eval has no stock task {task!r} to read local data for")
    return entry


def _split_file(data_dir: Path, task: str, split: str) -> Path:
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (data_dir / task / name).is_file():
            return (data_dir / task / name).resolve()
    raise TaskError(f"{data_dir / task / (split + '.jsonl.gz')} is missing: the local zero-shot data needs the "
                    f"'{split}' split of {task} there (JSONL, gzipped or not, with the Hub dataset's fields)")


def check_task_file(path: Path, task: str) -> int:
    """Every record of a local task file is JSON with the fields the stock task reads; returns the record count."""
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
                missing = [k for k in TASK_FIELDS.get(task, ()) if not isinstance(record, dict) or k not in record]
                if missing:
                    raise TaskError(f"{path}: line {n} lacks the field(s) {', '.join(missing)} that lm-eval's "
                                    f"{task} task reads (fields of its Hub dataset: {', '.join(TASK_FIELDS[task])})")
                count += 1
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TaskError(f"{path} cannot be read as {'gzipped ' if opener is gzip.open else ''}UTF-8 JSONL ({e})") \
            from None
    if count == 0:
        raise TaskError(f"{path} holds no records")
    return count


def check_local_data(data_dir: str | Path, tasks=DEFAULT_TASKS) -> dict[str, Path]:
    """The file of every task in the local zero-shot folder, each checked (exists, JSONL, the stock task's fields);
    fast, and without lm-eval: fit to run before any model loads."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise TaskError(f"zero-shot data folder {data_dir} does not exist; give the folder that holds "
                        f"<task>/<split>.jsonl.gz for {', '.join(DEFAULT_TASKS)}")
    unknown = [t for t in expand(tasks) if t not in SCORED_SPLIT]
    if unknown:
        raise TaskError(f"unknown task(s) {unknown} for local zero-shot data; available: {', '.join(DEFAULT_TASKS)} "
                        f"('default' = all seven), and dms_example (built in)")
    files = {t: _split_file(data_dir, t, SCORED_SPLIT[t]) for t in expand(tasks)}
    for task, path in files.items():
        check_task_file(path, task)
    return files


def write_local_tasks(data_dir: str | Path, out_dir: str | Path, tasks=DEFAULT_TASKS) -> Path:
    """Write into ``out_dir`` one YAML per task that includes lm-eval's stock task file and points only its data
    source at ``data_dir``; checks every data file first. Use it with ``lm_eval --include_path out_dir``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    files = check_local_data(data_dir, tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task, path in files.items():
        entry = _stock_entry(task)
        stock = load_yaml(entry.yaml_path, resolve_func=False)
        split = stock.get("test_split") or stock.get("validation_split")
        if split != SCORED_SPLIT[task]:
            raise TaskError(f"lm-eval's {task} task scores its '{split}' split, not '{SCORED_SPLIT[task]}' as this "
                            f"version of dms-llm expects; update dms-llm or lm-eval")
        # only the scored split is local: the other splits are unset, or the task would read them at construction
        # (for few-shot examples, which a zero-shot run never uses)
        unset = "".join(f"{key}: null\n" for key in ("training_split", "validation_split", "test_split")
                        if stock.get(key) and stock.get(key) != split)
        (out / f"{task}.yaml").write_text(
            f"# lm-eval's own {task} task ({entry.yaml_path}), reading its '{split}' split from a local file\n"
            f"include: {entry.yaml_path}\n"
            f"task: {task}\ntag: []\n"
            f"dataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {path}\n{unset}"
        )
    return out


def _resolved_task_dir(src: Path, dst: Path) -> None:
    """Copy a folder of the user's lm-eval YAML tasks, rewriting data file paths relative to each YAML to absolute
    ones (lm-eval resolves them from the working directory otherwise)."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".yaml", ".yml"):
            lines = []
            for line in path.read_text().splitlines():
                m = _DATA_FILE.match(line)
                if m and not Path(m.group(2)).is_absolute() and (path.parent / m.group(2)).exists():
                    line = f"{m.group(1)}{(path.parent / m.group(2)).resolve()}"
                lines.append(line)
            target.write_text("\n".join(lines) + "\n")
        else:
            shutil.copy2(path, target)


def task_manager(include_path: str | Path | None = None, data_dir: str | Path | None = None, tasks=()):
    """An lm-eval TaskManager that knows lm-eval's tasks, dms-llm's example task, ``include_path`` and — with
    ``data_dir`` — the stock ``tasks`` reading local data (they replace the Hub versions of the same names)."""
    from lm_eval.tasks import TaskManager

    tmp = Path(tempfile.mkdtemp(prefix="dms-llm-tasks-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # lm-eval reads the YAML files until the run ends
    _resolved_task_dir(BUILTIN_TASKS, tmp / "builtin")
    if include_path is not None:
        src = Path(include_path)
        if not src.is_dir():
            raise TaskError(f"task folder {src} does not exist; give a folder of lm-eval task YAML files")
        _resolved_task_dir(src, tmp / "user")
    if data_dir is not None:
        local = [t for t in expand(tasks) if t in SCORED_SPLIT]
        write_local_tasks(data_dir, tmp / "local", local)
    return TaskManager(include_path=str(tmp))


def check_tasks(tasks, include_path=None, data_dir=None):
    """Stop before any model loads on a task that is unknown or whose local data is missing or malformed; returns
    the TaskManager that knows them all."""
    names = expand(tasks)
    data_dir = data_dir_or_env(data_dir)
    if data_dir is not None and include_path is None:  # the fast checks first: names and files, no lm-eval
        check_local_data(data_dir, [t for t in names if t != "dms_example"])
    manager = task_manager(include_path, data_dir, names)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise TaskError(
            f"unknown lm-eval task(s) {unknown}; known here: {', '.join(DEFAULT_TASKS)} ('default'), dms_example "
            f"(built in, offline) and every task of `lm-eval ls tasks`; local task YAML files go in `include_path`")
    return manager


def weights_fingerprint(model) -> str:
    """A short digest of a model's configuration and weights (names, shapes, dtypes and two sums per tensor): what
    a request cache is keyed by, so that answers of one model are never served to another."""
    import hashlib

    import torch

    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            t = tensor.detach().double()
            digest.update(f"{name}{tuple(t.shape)}{tensor.dtype}{t.sum().item():.10e}{t.abs().sum().item():.10e}"
                          .encode())
    return digest.hexdigest()[:16]


def zero_shot(model, tokenizer, tasks=DEFAULT_TASKS, include_path=None, batch_size: int | str = 8,
              limit: int | None = None, num_fewshot: int = 0, data_dir=None, manager=None,
              cache: str | Path | None = None) -> dict:
    """Accuracy of ``model`` on lm-eval ``tasks``: ``{task: {"metric", "value", "stderr", "n", "scores"}, ...}``
    (``scores``: the reported metric of each document, in document order) plus ``"mean"`` over the tasks with its
    95% bootstrap interval (``low``, ``high``). With ``data_dir``: the stock tasks on local data (module docstring).
    ``cache``: a folder for lm-eval's request cache of this model (keyed by :func:`weights_fingerprint`), from which
    a run that was interrupted resumes."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = expand(tasks)
    manager = manager or check_tasks(tasks, include_path, data_dir)
    max_length = min(2048, int(getattr(model.config, "max_position_embeddings", 2048) or 2048))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=str(next(model.parameters()).device))
    use_cache = None
    if cache is not None:
        try:
            Path(cache).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TaskError(f"cannot use {cache} as the zero-shot request cache ({e.strerror}); give a folder that "
                            f"can be created and written, or leave the cache off") from None
        use_cache = str(Path(cache) / f"requests-{weights_fingerprint(model)}")  # lm-eval adds _rank0.db
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                          log_samples=True, verbosity="WARNING", use_cache=use_cache)
    results = {}
    for task in tasks:
        r = out["results"][task]
        metric = REPORTED_METRIC.get(task, "acc" if "acc,none" in r else next(k.split(",")[0] for k in r if "," in k))
        stderr = r.get(f"{metric}_stderr,none")
        samples = sorted(out["samples"][task], key=lambda x: x["doc_id"])
        results[task] = {
            "metric": metric,
            "value": r[f"{metric},none"],
            "stderr": stderr if isinstance(stderr, (int, float)) else None,
            "n": out.get("n-samples", {}).get(task, {}).get("effective"),
            "scores": [float(x[metric]) for x in samples],
        }
    if len(results) > 1:
        low, high = bootstrap_interval({t: r["scores"] for t, r in results.items()})
        results["mean"] = {"metric": "mean", "value": sum(r["value"] for r in results.values()) / len(results),
                           "stderr": None, "n": sum(r["n"] or 0 for r in results.values()), "low": low, "high": high}
    return results


def bootstrap_interval(scores: dict, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple:
    """The ``level`` percentile-bootstrap interval of the mean over tasks of the mean per task of ``scores``
    (``{task: [score per document]}``; documents resampled within each task). Paired differences: pass the
    per-document differences of two models on the same documents."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for values in scores.values():
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            raise TaskError("a task without scored documents has no interval")
        for start in range(0, resamples, 500):  # bounded memory on full splits (10,042 HellaSwag documents)
            idx = rng.integers(0, values.size, (min(500, resamples - start), values.size))
            total[start:start + idx.shape[0]] += values[idx].mean(axis=1)
    total /= len(scores)
    tail = (1 - level) / 2
    return float(np.quantile(total, tail)), float(np.quantile(total, 1 - tail))


def paired_difference(a: dict, b: dict, tasks=None, level: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> dict:
    """``a`` minus ``b`` (two :func:`zero_shot` results on the same documents) per task and for the mean over
    ``tasks`` (default: every task both have): ``{task: {"diff", "low", "high", "n"}, "mean": {...}}``, the intervals
    from a paired bootstrap over documents. An interval that excludes 0 says the order of the two models on these
    tasks is not a matter of which documents were drawn."""
    tasks = [t for t in a if t != "mean" and t in b] if tasks is None else list(tasks)
    diffs = {}
    for task in tasks:
        sa, sb = a[task].get("scores"), b[task].get("scores")
        if sa is None or sb is None or len(sa) != len(sb):
            raise TaskError(f"{task}: a paired comparison needs both models' scores on the same documents (got "
                            f"{len(sa or [])} and {len(sb or [])}); score both with the same tasks, data and limit")
        diffs[task] = [x - y for x, y in zip(sa, sb)]
    out = {}
    for i, (task, d) in enumerate(diffs.items()):
        low, high = bootstrap_interval({task: d}, level, resamples, seed + i)
        out[task] = {"diff": sum(d) / len(d), "low": low, "high": high, "n": len(d)}
    if len(diffs) > 1:
        low, high = bootstrap_interval(diffs, level, resamples, seed)
        out["mean"] = {"diff": sum(v["diff"] for v in out.values()) / len(diffs), "low": low, "high": high,
                       "n": sum(len(d) for d in diffs.values())}
    return out


__all__ = ["DEFAULT_TASKS", "REPORTED_METRIC", "TaskError", "bootstrap_interval", "check_local_data", "check_tasks",
           "paired_difference", "weights_fingerprint", "write_local_tasks", "zero_shot"]
