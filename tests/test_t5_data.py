"""Text tasks: JSONL parsing, YAML task specs, validation split, DataError on bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny_t5 import first_letter_examples, write_jsonl, write_task
from tvedit.data.text import (
    TextExample,
    is_text_task,
    load_finetune_task,
    load_text_task,
    read_jsonl,
)
from tvedit.errors import DataError


def test_rank_and_generation_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"input": "a b", "choices": ["yes", "no"], "label": 1},
            {"input": "c", "target": "d"},
        ],
    )
    (tmp_path / "t.jsonl").write_text(path.read_text() + "\n\n")  # blank lines are skipped
    rank, gen = read_jsonl(path)
    assert rank == TextExample("a b", "no", ("yes", "no"), 1)
    assert gen == TextExample("c", "d", None, None)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"choices": ["a", "b"], "label": 0}', "missing field 'input'"),
        ('{"input": "x", "choices": ["a", "b"], "label": 2}', "out of range"),
        ('{"input": "x", "choices": ["a"], "label": 0}', "at least two strings"),
        ('{"input": "x", "label": 0}', "no choices"),
        ('{"input": "x"}', "needs either 'target'"),
        ('{"input": 3, "target": "y"}', "must be a string"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"input": "ok", "target": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        read_jsonl(path)
    assert f"{path}:2:" in str(info.value)
    assert info.value.exit_code == 8


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_text_task(tmp_path / "missing.jsonl")


def test_yaml_spec_maps_columns_choices_and_template(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"review {i}", "verdict": "fresh" if i % 2 else "rotten"} for i in range(20)])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "great", "verdict": 1}])
    spec = tmp_path / "task.yaml"
    spec.write_text(
        "name: rt\ntrain: train.jsonl\ntest: test.jsonl\n"
        "columns: {input: text, label: verdict}\nchoices: [rotten, fresh]\ntemplate: 'review: {input}'\n"
    )
    assert is_text_task(spec) and is_text_task(tmp_path / "train.jsonl")
    write_jsonl(tmp_path / "images.jsonl", [{"path": "a.png", "label": "cat"}])
    assert not is_text_task(tmp_path / "images.jsonl")  # an image list for CLIP fine-tuning
    task = load_text_task(spec)
    assert task.name == "rt" and task.choices == ("rotten", "fresh") and task.ranked
    assert task.split("test") == [TextExample("review: great", "fresh", ("rotten", "fresh"), 1)]
    assert len(task.split("validation")) == 2 and len(task.split("train")) == 18
    assert task.spec.to_dict()["choices"] == ["rotten", "fresh"]
    spec.write_text("train: train.jsonl\nbogus: 1\n")
    with pytest.raises(DataError, match="unknown keys"):
        load_text_task(spec)


def test_directory_task_and_deterministic_validation(tmp_path: Path) -> None:
    root = write_task(tmp_path, "fl", first_letter_examples(60, seed=3), n_test=10)
    a, b = load_text_task(root), load_text_task(root)
    assert a.split("validation") == b.split("validation")
    assert len(a.split("validation")) == 5 and len(a.split("train")) == 45 and len(a.split("test")) == 10
    assert a.choices == ("yes", "no")
    ft = load_finetune_task(root)
    assert ft.name == "fl" and len(ft.train_idx) == 45 and len(ft.heldout_idx) == 5
    assert [ft.examples[i] for i in ft.heldout_idx] == a.split("validation")
    assert ft.record()["choices"] == ["yes", "no"] and ft.record()["data"]["sha256"] == ft.data_sha256
    (root / "train.jsonl").write_text((root / "train.jsonl").read_text() + '{"input": "q", "target": "free text"}\n')
    assert load_finetune_task(root).data_sha256 != ft.data_sha256
    with pytest.raises(DataError, match="without choices"):
        load_finetune_task(root, mode="sparse")
