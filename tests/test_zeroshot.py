from pathlib import Path

import pytest

from dms_llm.zeroshot import TaskError, _resolved_task_dir, task_manager, zero_shot


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
