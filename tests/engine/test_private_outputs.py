"""Outputs computed on private data are their owner's only: results.json of eval, attacks and defenses.

(Checkpoints, privacy.json, distill's results.json and federate-export are checked next to their
code: test_trainer.py, test_dp_trainer.py, test_dp_cli.py, test_federation_export.py.)
"""

from __future__ import annotations

import json
import os
import stat

from pydantic import BaseModel

from secure_kd.config import EvalJob, TinyModelConfig
from secure_kd.data import train_tiny_tokenizer
from secure_kd.eval_job import run_eval
from secure_kd.models import build_tiny
from secure_kd.plugins import write_result


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class _Found(BaseModel):
    extracted: list[str]


def test_an_attack_or_defense_result_is_written_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_result(tmp_path, _Found(extracted=["a secret the attack recovered"]))
    finally:
        os.umask(umask)
    assert _mode(path) == 0o600 and json.loads(path.read_text())["extracted"]


def test_eval_on_held_out_private_text_writes_results_0600(tmp_path):
    texts = [f"record {i}: the patient was seen on day {i}" for i in range(12)]
    tokenizer = train_tiny_tokenizer(texts, vocab_size=300)
    model = build_tiny(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), len(tokenizer), seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    job = EvalJob(
        model=str(tmp_path / "model"),
        out=str(tmp_path / "eval"),
        device="cpu",
        data={"heldout": str(heldout)},
    )
    umask = os.umask(0o022)
    try:
        run_eval(job, log=lambda message: None)
    finally:
        os.umask(umask)
    assert _mode(tmp_path / "eval" / "results.json") == 0o600
