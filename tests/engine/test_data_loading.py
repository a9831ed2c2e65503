"""Loading local files through `datasets`: every format, offline, and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from secure_kd.data import load_records, supported_formats, tokenize_records, train_tiny_tokenizer

ROWS = [
    {"text": "First record, with a comma.", "label": 1},
    {"text": 'Second record: "quoted" and unicode é.', "label": 0},
    {"text": "Third record", "label": 1},
]
CONFIG_DATA = Path(__file__).resolve().parents[2] / "configs" / "data"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the env is read at import time


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def as_rows(dataset):
    return [dict(row) for row in dataset]


def test_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, ROWS)
    assert as_rows(load_records(path)) == ROWS


def test_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert as_rows(load_records(path)) == ROWS


def test_csv(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(ROWS)
    assert as_rows(load_records(path)) == ROWS


def test_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert as_rows(load_records(path)) == ROWS


def test_txt_one_record_per_non_empty_line(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("alpha beta\n\n   \n  gamma\ndelta\n", encoding="utf-8")
    assert as_rows(load_records(path)) == [{"text": "alpha beta"}, {"text": "  gamma"}, {"text": "delta"}]


def test_format_overrides_the_extension(tmp_path):
    path = tmp_path / "data.log"
    write_jsonl(path, ROWS[:1])
    assert as_rows(load_records(path, format="jsonl")) == ROWS[:1]
    text_path = tmp_path / "notes.md"
    text_path.write_text("one\ntwo\n", encoding="utf-8")
    assert as_rows(load_records(text_path, format="text")) == [{"text": "one"}, {"text": "two"}]


def test_nested_chat_records_survive(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, rows)
    assert as_rows(load_records(path)) == rows


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        load_records(missing)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_records(tmp_path)


def test_unknown_extension_names_the_supported_ones(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("text: hi\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"unsupported extension '\.yaml'.*\.csv, \.json, \.jsonl, \.parquet, \.txt"
    ):
        load_records(path)
    with pytest.raises(ValueError, match="unsupported format 'xml'"):
        load_records(path, format="xml")
    assert supported_formats() == ["csv", "json", "jsonl", "parquet", "txt"]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_files_are_refused(tmp_path, content):
    for name in ("empty.jsonl", "empty.txt", "empty.csv"):
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=f"{path.name} is empty"):
            load_records(path)


def test_empty_json_array_is_refused(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.json"):
        load_records(path)


def test_malformed_file_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"could not read .*broken\.jsonl as jsonl"):
        load_records(path)


def test_persistent_cache_dir(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, ROWS)
    cache = tmp_path / "cache"
    assert as_rows(load_records(path, cache_dir=cache)) == ROWS
    assert cache.is_dir() and any(cache.iterdir())


@pytest.mark.parametrize(
    ("name", "schema_field"),
    [("support_chat.jsonl", "messages"), ("qa_prompt_completion.jsonl", "completion")],
)
def test_example_files_in_configs_load_and_tokenize(name, schema_field):
    records = load_records(CONFIG_DATA / name)
    assert schema_field in records.column_names and len(records) >= 3
    texts = [json.dumps(row) for row in records]
    tokenizer = train_tiny_tokenizer(texts, vocab_size=300)
    examples = tokenize_records(records, tokenizer, max_length=256)
    assert len(examples) == len(records)
    assert all(e.n_trained > 0 and e.n_trained < len(e) for e in examples)
