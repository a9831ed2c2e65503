"""`train.teacher_hacking` on a user's distillation job: the callback records proxy and golden per
evaluation, flags (and stops) when the student approaches a bad teacher while getting worse on held-out
text, and stays quiet when the teacher is good."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.config import ConfigError, load_config

WORDS = "the river runs past old mills and quiet green fields toward the sea at dusk".split()
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


def texts(n: int, offset: int = 0) -> list[str]:
    return [" ".join(WORDS[(i + offset + j) % len(WORDS)] for j in range(10)) for i in range(n)]


def write(path, rows):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return str(path)


def run_job(tmp_path, name: str, config: dict) -> dict:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["distill", "--config", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / name / "results.json").read_text()) | {"_output": result.output}


def base(tmp_path, name: str, **changes) -> dict:
    config = {
        "seed": 0,
        "device": "cpu",
        "out": str(tmp_path / name),
        "teacher": {"source": "tiny", "tiny": TINY},
        "student": {"source": "tiny", "tiny": TINY},
        "tokenizer": "tiny:300",
        "data": {
            "train": write(tmp_path / "train.jsonl", texts(64)),
            "heldout": write(tmp_path / "heldout.jsonl", texts(16, offset=3)),
            "max_length": 24,
        },
        "kd": {"loss": "forward_kl", "top_k": None},
        "train": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "schedule": "constant", "eval_batches": 2},
    }
    for key, value in changes.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A student fitted to the data by cross-entropy alone: a good model of the text (and its tokenizer)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    config = base(tmp, "ce", kd__kd_weight=0.0, kd__ce_weight=1.0, train__max_steps=40)
    result = run_job(tmp, "ce", config)
    assert result["student_after"]["nll"] < 0.5 * result["student_before"]["nll"]
    return tmp / "ce" / "student"


MONITOR = {"every": 3, "patience": 2, "proxy_batches": 2, "golden_batches": 1}


def heldout_nll(model_dir, tokenizer_dir, rows: list[str]) -> float:
    """Mean next-token NLL per token of `rows` (each + eos), by plain torch cross-entropy."""
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for text in rows:
            ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return total / n


def test_fires_and_stops_when_the_student_chases_a_bad_teacher(tmp_path, trained):
    # a good student (fitted to the text) distilled toward a random teacher: proxy falls, held-out NLL rises
    config = base(
        tmp_path,
        "hacked",
        train__teacher_hacking={**MONITOR, "action": "stop"},
    )
    config["tokenizer"] = str(trained)
    config["student"] = {"source": str(trained)}
    result = run_job(tmp_path, "hacked", config)
    report = result["teacher_hacking"]
    history = report["history"]
    assert report["flagged_at_step"] is not None and report["stopped_at_step"] == report["flagged_at_step"]
    assert result["steps"] == report["stopped_at_step"] < 30
    assert [p["step"] for p in history] == list(range(3, report["stopped_at_step"] + 1, 3))
    assert history[-1]["hacking"] and history[-2]["hacking"]
    assert history[-1]["proxy"] < history[0]["proxy"] and history[-1]["golden"] > history[0]["golden"]
    assert "warning: teacher hacking at step" in result["_output"]
    # the recorded golden metric at the stop is the saved student's held-out NLL on the first batch
    rows = texts(16, offset=3)[:8]
    expected = heldout_nll(tmp_path / "hacked" / "student", trained, rows)
    assert history[-1]["golden"] == pytest.approx(expected, rel=1e-4)


def test_warn_only_trains_to_the_end(tmp_path, trained):
    config = base(
        tmp_path, "warned", train__teacher_hacking={**MONITOR, "action": "warn"}, train__max_steps=15
    )
    config["tokenizer"] = str(trained)
    config["student"] = {"source": str(trained)}
    result = run_job(tmp_path, "warned", config)
    assert result["steps"] == 15 and result["teacher_hacking"]["stopped_at_step"] is None
    assert result["teacher_hacking"]["flagged_at_step"] is not None
    assert len(result["teacher_hacking"]["history"]) == 5


def test_quiet_when_the_teacher_is_good(tmp_path, trained):
    # a random student distilled from the fitted model: both metrics fall, nothing flags
    config = base(tmp_path, "clean", train__teacher_hacking={**MONITOR, "action": "stop"})
    config["tokenizer"] = str(trained)
    config["teacher"] = {"source": str(trained)}
    result = run_job(tmp_path, "clean", config)
    report = result["teacher_hacking"]
    assert result["steps"] == 30 and report["flagged_at_step"] is None and len(report["history"]) == 10
    assert report["history"][-1]["golden"] < report["history"][0]["golden"]
    assert not any(p["hacking"] for p in report["history"])


def test_refused_with_dp(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base(tmp_path, "dp", train__teacher_hacking=MONITOR)))
    with pytest.raises(ConfigError, match="train.teacher_hacking evaluates the student"):
        load_config(str(path), ["train.privacy.target_epsilon=8"])
