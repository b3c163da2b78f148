"""Zero-shot tasks: lm-eval's stock tasks on local data (the same requests as the stock task), the built-in example
task, the plain lm_eval command on an export, and the errors for missing or malformed data."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dms_llm.zeroshot import (
    DEFAULT_TASKS,
    TaskError,
    _resolved_task_dir,
    bootstrap_interval,
    check_tasks,
    paired_difference,
    task_manager,
    weights_fingerprint,
    write_local_tasks,
    zero_shot,
)

# a few made-up records per task, in the field layout of the Hub dataset lm-eval's stock task reads
DOCS = {
    "boolq": [{"question": "is the sky blue on a clear day", "passage": "Sky -- The sky looks blue by day.",
               "idx": i, "label": i % 2} for i in range(3)],
    "piqa": [{"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0}
             for i in range(3)],
    "hellaswag": [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he",
                   "ctx": "A man cracks an egg. he", "endings": ["fries it.", "sings.", "flies [title] away.", "naps."],
                   "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"} for i in range(3)],
    "winogrande": [{"sentence": "Ann gave Bo the cup because _ was thirsty.", "option1": "Ann", "option2": "Bo",
                    "answer": "2"} for _ in range(3)],
    "arc_easy": [{"id": f"e{i}", "question": "Which is a liquid?", "answerKey": "B",
                  "choices": {"text": ["rock", "water", "wood"], "label": ["A", "B", "C"]}} for i in range(3)],
    "arc_challenge": [{"id": f"c{i}", "question": "What melts ice?", "answerKey": "1",
                       "choices": {"text": ["heat", "cold"], "label": ["1", "2"]}} for i in range(3)],
    "openbookqa": [{"id": f"o{i}", "question_stem": "Plants need", "answerKey": "A",
                    "choices": {"text": ["light", "noise", "plastic", "glass"], "label": ["A", "B", "C", "D"]}}
                   for i in range(3)],
}
SPLITS = {"arc_easy": "test", "arc_challenge": "test", "openbookqa": "test"}


def write_data(folder: Path, docs=DOCS) -> Path:
    for task, records in docs.items():
        (folder / task).mkdir(parents=True, exist_ok=True)
        with gzip.open(folder / task / f"{SPLITS.get(task, 'validation')}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return folder


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "zeroshot")


def _requests(task):
    """What the task asks the model, per document: the (context, continuation) pairs, and the gold answer."""
    docs = list(task.eval_docs)
    return [([r.args for r in task.construct_requests(doc=d, ctx=task.fewshot_context(d, num_fewshot=0))],
             task.doc_to_target(d)) for d in docs]


@pytest.mark.parametrize("name", DEFAULT_TASKS)
def test_local_data_gives_the_stock_tasks_requests(data, name, monkeypatch):
    """The task built on local data renders exactly the prompts, choices and targets of lm-eval's stock task on the
    same documents, with the same metrics (the stock task gets the documents injected instead of downloaded)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    from dms_llm.zeroshot import _stock_manager

    local = check_tasks([name], data_dir=data).load([name])["tasks"][name]
    split = SPLITS.get(name, "validation")

    def inject(self, dataset_kwargs=None, **kwargs):  # the stock task's Hub download, served from memory
        self.dataset = datasets.DatasetDict({s: datasets.Dataset.from_list(DOCS[name])
                                             for s in ("train", "validation", "test")})

    monkeypatch.setattr(ConfigurableTask, "download", inject)
    stock = _stock_manager().load([name])["tasks"][name]
    assert stock.config.dataset_path != "json" and local.config.dataset_path == "json"
    assert stock.config.test_split == local.config.test_split or split == "validation"
    assert _requests(local) == _requests(stock) and len(_requests(local)) == 3
    assert sorted(local.aggregation()) == sorted(stock.aggregation())
    assert local.higher_is_better() == stock.higher_is_better()


def test_zero_shot_reports_the_papers_metrics_and_their_mean(gqa_model, data):
    from .conftest import char_tokenizer

    results = zero_shot(gqa_model, char_tokenizer(), "default", data_dir=data, limit=2, batch_size=4)
    assert list(results) == [*DEFAULT_TASKS, "mean"]
    assert results["hellaswag"]["metric"] == "acc_norm" and results["boolq"]["metric"] == "acc"
    assert all(0 <= r["value"] <= 1 and r["n"] == 2 and r["stderr"] is not None
               for t, r in results.items() if t != "mean")
    assert results["mean"]["value"] == pytest.approx(sum(results[t]["value"] for t in DEFAULT_TASKS) / 7)


def test_per_document_scores_make_the_accuracy_and_resume_from_the_request_cache(gqa_model, data, tmp_path,
                                                                                     monkeypatch):
    """Each task keeps its documents' scores (their mean is lm-eval's accuracy); the mean has an interval around it;
    a second run with the same cache asks the model nothing and gives the same scores."""
    from lm_eval.models.huggingface import HFLM

    from .conftest import char_tokenizer

    tasks = ["piqa", "hellaswag"]
    first = zero_shot(gqa_model, char_tokenizer(), tasks, data_dir=data, limit=3, batch_size=4, cache=tmp_path / "c")
    for task in tasks:
        assert len(first[task]["scores"]) == 3 and set(first[task]["scores"]) <= {0.0, 1.0}
        assert sum(first[task]["scores"]) / 3 == pytest.approx(first[task]["value"])
    assert first["mean"]["low"] <= first["mean"]["value"] <= first["mean"]["high"]
    assert len(list((tmp_path / "c").glob("requests-*.db"))) == 1

    def no_model(self, requests, *args, **kwargs):
        raise AssertionError(f"{len(requests)} requests reached the model: the cache did not answer them")

    monkeypatch.setattr(HFLM, "loglikelihood", no_model)
    again = zero_shot(gqa_model, char_tokenizer(), tasks, data_dir=data, limit=3, batch_size=4, cache=tmp_path / "c")
    assert all(again[t]["scores"] == first[t]["scores"] for t in tasks)


def test_a_request_cache_that_cannot_be_written_says_so(gqa_model, data, tmp_path):
    from .conftest import char_tokenizer

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TaskError, match="cannot use .*file/cache as the zero-shot request cache"):
        zero_shot(gqa_model, char_tokenizer(), ["piqa"], data_dir=data, limit=1, cache=tmp_path / "file" / "cache")


def test_the_request_cache_is_keyed_by_the_weights(gqa_model):
    import copy

    import torch

    other = copy.deepcopy(gqa_model)
    assert weights_fingerprint(other) == weights_fingerprint(gqa_model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert weights_fingerprint(other) != weights_fingerprint(gqa_model)


def test_paired_difference_is_exact_for_identical_models_and_finds_a_real_gap():
    import numpy as np

    rng = np.random.default_rng(0)
    a = {t: {"scores": rng.integers(0, 2, 300).astype(float).tolist()} for t in ("x", "y")}
    same = paired_difference(a, a)
    assert all(v["diff"] == v["low"] == v["high"] == 0 for v in same.values())
    # b = a with every 10th document made wrong (about 5% fewer right): a is better, and the paired interval says so
    b = {t: {"scores": [0.0 if i % 10 == 0 else s for i, s in enumerate(v["scores"])]} for t, v in a.items()}
    gap = paired_difference(a, b)
    truth = {t: (np.array(a[t]["scores"]) - np.array(b[t]["scores"])).mean() for t in a}
    assert gap["x"]["diff"] == pytest.approx(truth["x"])
    assert gap["mean"]["diff"] == pytest.approx(np.mean([*truth.values()]))
    assert 0 < gap["mean"]["low"] < gap["mean"]["diff"] < gap["mean"]["high"]
    # unpaired, the two models' intervals overlap: pairing is what separates them
    assert bootstrap_interval({t: v["scores"] for t, v in b.items()})[1] > bootstrap_interval(
        {t: v["scores"] for t, v in a.items()})[0]
    with pytest.raises(TaskError, match="same documents"):
        paired_difference(a, {t: {"scores": v["scores"][:-1]} for t, v in a.items()})


def test_data_folder_can_come_from_the_environment(data, monkeypatch):
    monkeypatch.setenv("DMS_LLM_ZEROSHOT_DATA", str(data))
    assert "boolq" in check_tasks(["boolq"]).all_tasks


@pytest.mark.parametrize("damage, message", [
    ("missing", "boolq/validation.jsonl.gz is missing"),
    ("fields", r"line 2 lacks the field\(s\) passage"),
    ("empty", "holds no records"),
    ("not json", "line 1 is not valid JSON"),
])
def test_missing_or_malformed_data_names_the_file_and_the_fault(tmp_path, damage, message):
    docs = {"boolq": [DOCS["boolq"][0], {"question": "q", "label": 1}]}
    folder = write_data(tmp_path / "zs", docs)
    path = folder / "boolq" / "validation.jsonl.gz"
    if damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(gzip.compress(b""))
    elif damage == "not json":
        path.write_bytes(gzip.compress(b"{not json\n"))
    with pytest.raises(TaskError, match=message) as error:
        check_tasks(["boolq"], data_dir=folder)
    assert "boolq" in str(error.value)


def test_unknown_task_lists_the_available_ones(data, tmp_path):
    with pytest.raises(TaskError, match="unknown task.*no_such_task.*boolq, piqa, hellaswag.*dms_example"):
        check_tasks(["boolq", "no_such_task"], data_dir=data)
    with pytest.raises(TaskError, match="unknown lm-eval task.*no_such_task_xyz.*lm-eval ls tasks"):
        check_tasks(["no_such_task_xyz"])
    with pytest.raises(TaskError, match="does not exist"):
        check_tasks(["boolq"], data_dir=tmp_path / "nowhere")


def test_plain_lm_eval_command_runs_the_local_tasks_on_an_export(pruned_folder, data, tmp_path):
    tasks = write_local_tasks(data, tmp_path / "tasks", ["boolq", "arc_easy"])
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                           f"pretrained={pruned_folder},trust_remote_code=True", "--tasks", "boolq,arc_easy",
                           "--include_path", str(tasks), "--limit", "2", "--device", "cpu", "--batch_size", "2",
                           "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())["results"]
    assert set(results) == {"boolq", "arc_easy"} and 0 <= results["boolq"]["acc,none"] <= 1


def test_example_task_is_known_and_its_data_path_is_absolute(tmp_path):
    _resolved_task_dir(Path(__file__).resolve().parents[1] / "dms_llm" / "tasks", tmp_path)
    text = (tmp_path / "dms_example" / "dms_example.yaml").read_text()
    line = next(x for x in text.splitlines() if "test:" in x)
    path = Path(line.split("test:")[1].strip())
    assert path.is_absolute() and path.exists()
    assert "dms_example" in task_manager().all_tasks


def test_user_task_folder_with_relative_data(tmp_path):
    folder = tmp_path / "mytasks"
    folder.mkdir()
    (folder / "qa.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    (folder / "my_qa.yaml").write_text(
        "task: my_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: qa.jsonl\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    assert "my_qa" in task_manager(folder).all_tasks
    with pytest.raises(TaskError, match="does not exist"):
        task_manager(tmp_path / "missing")


def test_unknown_task_is_refused_before_evaluating(gqa_model):
    with pytest.raises(TaskError, match="unknown lm-eval task"):
        zero_shot(gqa_model, tokenizer=None, tasks=["no_such_task_xyz"])
