"""attacks/teacher_attribution.py: the plugin on its own case and on saved models with a known answer (a
student saved as a copy of the second teacher), its reading, and its refusals."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from attacks import get_attack
from secure_kd.config import TinyModelConfig
from secure_kd.data import train_tiny_tokenizer
from secure_kd.models import build_tiny

TEXTS = [f"order {i} shipped to the customer with tracking code {i * 7}" for i in range(40)]


def test_its_own_case_attributes_every_record_to_the_copied_teacher(tmp_path):
    plugin = get_attack("teacher_attribution")
    result = plugin.run(plugin.Config(out=str(tmp_path), device="cpu", suspect=1)).model_dump(mode="json")
    assert result["suspect"] == "teacher_1"
    shares = {t["teacher"]: t["records"] for t in result["attribution"]["teachers"]}
    assert shares == {"teacher_0": 0, "teacher_1": 64, "teacher_2": 0}
    reading = plugin.measure(result, 0, 0.95)["suspect_teacher_share"]
    assert reading.value == 1.0 and reading.ci_low > 0.9
    assert json.loads((tmp_path / "results.json").read_text())["suspect"] == "teacher_1"


def test_saved_models_and_records(tmp_path):
    tokenizer = train_tiny_tokenizer(TEXTS, vocab_size=300)
    dirs = []
    for i in range(3):
        model = build_tiny(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tokenizer), seed=i)
        path = tmp_path / f"teacher{i}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(str(path))
        if i == 2:  # the student: a copy of the third teacher
            copy.deepcopy(model).save_pretrained(tmp_path / "student")
            tokenizer.save_pretrained(tmp_path / "student")
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    plugin = get_attack("teacher_attribution")
    config = plugin.Config(
        out=str(tmp_path / "out"), device="cpu", model=str(tmp_path / "student"),
        teachers=dirs, data=str(records), suspect=2,
    )  # fmt: skip
    result = plugin.run(config)
    assert result.suspect == dirs[2]
    assert [t.records for t in result.attribution.teachers] == [0, 0, 40]
    with_first = plugin.run(config.model_copy(update={"suspect": 0}))
    assert plugin.measure(with_first.model_dump(mode="json"), 0, 0.95)["suspect_teacher_share"].value == 0.0


def test_refusals(tmp_path):
    Config = get_attack("teacher_attribution").Config
    with pytest.raises(ValidationError, match="needs `teachers`"):
        Config(model=str(tmp_path), teachers=[str(tmp_path)], data="x.jsonl")
    with pytest.raises(ValidationError, match="suspect 3 is not an index of the 3 teachers"):
        Config(suspect=3)
