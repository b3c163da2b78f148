"""Zero-shot accuracy through lm-eval on an in-memory model, online tasks or offline local task files.

Reported metric per task, as LLM-Pruner and the DMS paper report them: acc for BoolQ, PIQA, WinoGrande, ARC-e;
acc_norm for HellaSwag, ARC-c, OpenBookQA; acc for any other task that has it.
"""

from __future__ import annotations

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
BUILTIN_TASKS = Path(__file__).parent / "tasks"


class TaskError(DMSError, ValueError):
    """An lm-eval task that cannot be found or run."""
_DATA_FILE = re.compile(r"^(\s*[\w-]+:\s*)([^\s#'\"]+\.(?:jsonl|json|csv|parquet|txt))\s*$")


def _resolved_task_dir(src: Path, dst: Path) -> None:
    """Copy a folder of lm-eval YAML tasks, rewriting data file paths relative to each YAML to absolute ones
    (lm-eval resolves them from the working directory otherwise)."""
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


def task_manager(include_path: str | Path | None = None):
    """An lm-eval TaskManager that knows lm-eval's tasks, dms-llm's example task and ``include_path``."""
    from lm_eval.tasks import TaskManager

    tmp = Path(tempfile.mkdtemp(prefix="dms-llm-tasks-"))
    _resolved_task_dir(BUILTIN_TASKS, tmp / "builtin")
    if include_path is not None:
        src = Path(include_path)
        if not src.is_dir():
            raise TaskError(f"task folder {src} does not exist; give a folder of lm-eval task YAML files")
        _resolved_task_dir(src, tmp / "user")
    return TaskManager(include_path=str(tmp))


def zero_shot(model, tokenizer, tasks=DEFAULT_TASKS, include_path=None, batch_size: int = 8, limit: int | None = None,
              num_fewshot: int = 0) -> dict:
    """Accuracy of ``model`` on lm-eval ``tasks``: ``{task: {"metric", "value", "stderr", "n"}}``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = [t for name in tasks for t in (DEFAULT_TASKS if name == "default" else [name]) if t]
    manager = task_manager(include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise TaskError(
            f"unknown lm-eval task(s) {unknown}; list them with `lm-eval ls tasks`, or give --include-path with "
            f"local task YAML files (the built-in offline example is 'dms_example')"
        )
    max_length = min(2048, int(getattr(model.config, "max_position_embeddings", 2048) or 2048))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=str(next(model.parameters()).device))
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                          log_samples=False, verbosity="WARNING")
    results = {}
    for task in tasks:
        r = out["results"][task]
        metric = REPORTED_METRIC.get(task, "acc" if "acc,none" in r else next(k.split(",")[0] for k in r if "," in k))
        stderr = r.get(f"{metric}_stderr,none")
        results[task] = {
            "metric": metric,
            "value": r[f"{metric},none"],
            "stderr": stderr if isinstance(stderr, (int, float)) else None,
            "n": out.get("n-samples", {}).get(task, {}).get("effective"),
        }
    return results
