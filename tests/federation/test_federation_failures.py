"""Failures that used to report success (issue 19 item 2).

- With `train.privacy.untie_embeddings: true` and a tied student, DP-SGD untied the output layer in
  training only: every later stage rebuilt the tied student (fedavg's server too), so fed_distill's final
  stage failed in every organization and fedavg's first upload was refused, while fed_distill still
  wrote `completed: true` and exited 0. Now every stage builds the untied student and both modes run.
- A final stage that fewer than `min_clients` complete fails the run; `secure-kd federate` exits
  non-zero with one line naming each organization, its stage and the cause from its own error log (the
  server only ever saw a generic code)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml
from safetensors import safe_open
from test_federation_apps import RUN_ID, LocalGrid, federate, tiny_job
from transformers import LlamaConfig, LlamaForCausalLM

from federation.client.workspace import STUDENT_FILE
from federation.job_data import job_data
from federation.run import failure_summary, prepare_organizations
from federation.server.app import FederationServer
from federation.server.session import FederationFailed
from federation.simulation.mods import simulation_client_app


def _federate_one_at_a_time(job):
    """LocalGrid delivering one message at a time: loading a model directory in several threads at once
    trips transformers' (not thread-safe) lazy imports and meta-device loading; Flower's engine runs
    ClientApps in separate processes, where this does not arise."""
    prepare_organizations(job)
    grid = LocalGrid(simulation_client_app(job), job.n_organizations)
    grid.pool.shutdown()
    grid.pool = ThreadPoolExecutor(max_workers=1)
    try:
        return FederationServer(grid, job, RUN_ID).run()
    finally:
        grid.pool.shutdown(wait=False, cancel_futures=True)


def _tied_student(tmp_path, vocab: int):
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied-student")
    return str(tmp_path / "tied-student")


@pytest.mark.parametrize("mode", ["fed_distill", "fedavg"])
def test_untie_embeddings_with_a_tied_student_runs_every_stage(tmp_path, mode):
    vocab = len(job_data(tiny_job(tmp_path)).tokenizer)
    privacy = {
        "noise_multiplier": 1.2,
        "delta": 1e-3,
        "ledger_dir": str(tmp_path / "ledgers"),
        "untie_embeddings": True,
        "grad_sample_mode": "ghost",
    }
    job = tiny_job(
        tmp_path,
        n_organizations=2,
        mode=mode,
        student={"source": _tied_student(tmp_path, vocab)},
        train={"max_steps": 2, "batch_size": 4, "lr": 3e-3, "eval_batches": 1, "privacy": privacy},
    )
    result = _federate_one_at_a_time(job)
    assert result.completed and result.rounds[0].answered == ["org-0", "org-1"]
    assert result.final.answered == ["org-0", "org-1"] and not result.final.dropped
    for org in ("org-0", "org-1"):
        with safe_open(str(tmp_path / "run" / "orgs" / org / STUDENT_FILE), "pt") as saved:
            embed, head = saved.get_tensor("model.embed_tokens.weight"), saved.get_tensor("lm_head.weight")
        assert not torch.equal(embed, head)  # two matrices, each trained by DP-SGD, both kept


def test_a_final_stage_that_fails_everywhere_fails_the_run_with_one_line_per_organization(tmp_path):
    job = tiny_job(
        tmp_path, n_organizations=2, mode="fed_distill", simulate_faults={0: "crash_final", 1: "crash_final"}
    )
    with pytest.raises(FederationFailed, match="round 2, final: 0 organization") as caught:
        federate(job)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["completed"] is False and saved["final"] is None
    assert saved["rounds"][0]["answered"] == ["org-0", "org-1"]  # the rounds themselves went through
    result = type("R", (), {"run_id": saved["run_id"]})()
    assert saved["run_id"] == RUN_ID
    line = failure_summary(job, result, str(caught.value))
    assert "\n" not in line
    assert line.startswith(
        "org-0, stage final-digest: RuntimeError: org-0: simulated crash in the final stage "
        "(simulate_faults); org-1, stage final-digest: RuntimeError: org-1: simulated crash in the final "
        "stage (simulate_faults) [round 2, final: 0 organization(s) answered, min_clients is 2; dropped: "
    )
    for org in ("org-0", "org-1"):  # in the order the replies came
        assert f"{org}: client failed: secure-kd/failed at final-digest from {org}" in line


@pytest.mark.integration
def test_secure_kd_federate_exits_non_zero_naming_the_organization_stage_and_cause(tmp_path):
    """The real simulation engine (Ray workers) and the CLI, exactly as a user runs it."""
    from typer.testing import CliRunner

    from secure_kd.app.cli import app

    job = tiny_job(
        tmp_path,
        n_organizations=2,
        mode="fed_distill",
        simultaneous_clients=2,
        simulate_faults={1: "crash_final"},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json", exclude={"schema_version"})))
    outcome = CliRunner().invoke(app, ["federate", "--config", str(path), "--no-progress"])
    assert outcome.exit_code != 0
    assert "federation done" not in outcome.output
    assert (
        "org-1, stage final-digest: RuntimeError: org-1: simulated crash in the final stage" in outcome.output
    )
    assert "Traceback" not in outcome.output
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["completed"] is False
