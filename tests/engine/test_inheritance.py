"""`secure-kd audit --inherit`: per record, memorized by the teacher only, by both, by the student only.
Known answers: a student identical to the teacher inherits everything the teacher memorized (fraction 1,
nothing teacher-only or student-only); an untrained student inherits nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.config import TinyModelConfig, load_config
from secure_kd.data import generate_corpus
from secure_kd.distill_job import run_distill
from secure_kd.model_files import load_tokenizer
from secure_kd.models import build_tiny
from secure_kd.proportions import wilson_interval


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("inherit")
    corpus = generate_corpus(40, seed=7, n_canaries=0)
    (root / "train.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in corpus.records))
    heldout = generate_corpus(8, seed=8, n_canaries=0)
    (root / "heldout.jsonl").write_text(
        "".join(json.dumps({"text": r["text"]}) + "\n" for r in heldout.records)
    )
    job = load_config(
        "configs/tiny.yaml",
        [f"out={root / 'teacher'}", f"data.train={root / 'train.jsonl'}",
         f"data.heldout={root / 'heldout.jsonl'}", "kd.kd_weight=0", "kd.ce_weight=1", "train.max_steps=200",
         "train.lr=3e-3", "train.schedule=constant", "train.checkpoint_every=1000", "data.max_length=48",
         "student.tiny.hidden_size=64", "student.tiny.num_layers=2", "student.tiny.num_heads=4"],
    )  # fmt: skip
    run_distill(job, progress=False, log=lambda *a, **k: None)
    teacher = root / "teacher" / "student"
    untrained = root / "untrained"
    tokenizer = load_tokenizer(teacher)
    build_tiny(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tokenizer), seed=3
    ).save_pretrained(untrained, safe_serialization=True)
    tokenizer.save_pretrained(untrained)
    return root, teacher, untrained


def _inherit(teacher, student, data, out):
    result = CliRunner().invoke(
        app, ["audit", "--inherit", "--teacher", str(teacher), "--model", str(student), "--data", str(data),
              "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())["inheritance"]


def test_a_copy_of_the_teacher_inherits_everything_and_an_untrained_student_nothing(
    teacher_and_data, tmp_path
):
    root, teacher, untrained = teacher_and_data
    same = _inherit(teacher, teacher, root / "train.jsonl", tmp_path / "same")
    n_teacher = same["counts"]["both"]
    assert n_teacher >= 10  # the teacher completes many of its 40 records verbatim after 200 CE steps
    assert same["counts"]["teacher_only"] == 0 and same["counts"]["student_only"] == 0
    assert same["inherited_fraction"] == 1.0
    assert same["inherited_ci"] == pytest.approx(list(wilson_interval(n_teacher, n_teacher)))
    none = _inherit(teacher, untrained, root / "train.jsonl", tmp_path / "none")
    assert none["counts"]["teacher_only"] == n_teacher and none["counts"]["both"] == 0
    assert none["inherited_fraction"] == 0.0 and none["inherited_ci"][0] == 0.0 < none["inherited_ci"][1]
    html = (tmp_path / "none" / "report.html").read_text()
    assert "What the student inherits" in html and "inherited fraction 0.00" in html


def test_inherit_needs_teacher_student_and_data(tmp_path):
    result = CliRunner().invoke(app, ["audit", "--inherit", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--inherit needs" in result.output
