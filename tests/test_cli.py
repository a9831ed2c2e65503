"""The command line: validate prints ok or every problem (exit 2, no traceback)."""

from __future__ import annotations

from typer.testing import CliRunner

from secure_kd.cli import app

runner = CliRunner()


def test_validate_ok():
    result = runner.invoke(app, ["validate", "configs/tiny.yaml"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "ok"


def test_validate_reports_every_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kd: {temperature: 0, params: {beta: 2}}\ntrain: {lr: -1}\nbogus: 1\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    text = result.output
    assert "Traceback" not in text
    for field in ("kd.temperature", "train.lr", "bogus"):
        assert field in text


def test_validate_with_override_error():
    result = runner.invoke(app, ["validate", "configs/tiny.yaml", "--set", "kd.params.beta=-0.5"])
    assert result.exit_code == 2 and "beta" in result.output


def test_distill_missing_config_file():
    result = runner.invoke(app, ["distill", "--config", "nope.yaml"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_bench_unknown_name():
    result = runner.invoke(app, ["bench", "no_such_bench"])
    assert result.exit_code == 2 and "no benchmark" in result.output


def test_attack_list_and_unknown():
    listed = runner.invoke(app, ["attack", "list"])
    assert listed.exit_code == 0 and "logit_leak" in listed.output
    unknown = runner.invoke(app, ["attack", "no_such_attack"])
    assert unknown.exit_code == 2 and "available" in unknown.output


def test_attack_logit_leak_from_cli(tmp_path):
    result = runner.invoke(
        app, ["attack", "logit_leak", "--config", "configs/attacks/logit_leak.yaml", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    import json

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema_version"] == 1
    assert data["estimated_hidden_size"] == data["true_hidden_size"]


def test_attack_bad_config_is_a_user_error(tmp_path):
    result = runner.invoke(
        app, ["attack", "logit_leak", "--config", "configs/attacks/logit_leak.yaml", "--set", "bogus=1"]
    )
    assert result.exit_code == 2 and "bogus" in result.output


def test_validate_federated_configs():
    for name in ("configs/federated-he.yaml", "configs/federated-plain.yaml", "configs/federated-p2p.yaml"):
        result = runner.invoke(app, ["validate", name, "--kind", "federate"])
        assert result.exit_code == 0, result.output


def test_federate_bad_override_is_a_user_error():
    result = runner.invoke(
        app, ["federate", "--config", "configs/federated-plain.yaml", "--set", "rounds=-1"]
    )
    assert result.exit_code == 2 and "rounds" in result.output


def test_threads_option_sets_torchs_thread_count():
    import torch

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    try:
        result = runner.invoke(app, ["--threads", str(wanted), "validate", "configs/tiny.yaml"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == wanted
        refused = runner.invoke(app, ["--threads", "0", "validate", "configs/tiny.yaml"])
        assert refused.exit_code == 2 and "--threads" in refused.output
    finally:
        torch.set_num_threads(before)
