"""`secure-kd audit`: verdict thresholds, intervals, failure isolation, resume, the --fail-on gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from attacks import get_attack
from secure_kd.app.cli import app
from secure_kd.app.report.audit import AuditResult, attack_config, gate, run_audit
from secure_kd.app.report.config import AuditConfig, Threshold, default_thresholds
from secure_kd.app.report.verdict import Measurement, level_of, risk_verdicts
from secure_kd.app.report.verdict import run_values as plugin_values
from secure_kd.config import ConfigError, load_config
from secure_kd.metrics import roc_metrics
from secure_kd.plugins import Plugin, PluginConfig, write_result
from secure_kd.proportions import wilson_interval
from secure_kd.readings import scores_from_roc

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
DEFAULT_THRESHOLDS = default_thresholds()


def run_values(attack: str, result: dict, extra: dict[str, str], **kwargs):
    """The readings of one run of a registered attack, as the audit takes them (its registration's)."""
    return plugin_values(get_attack(attack), result, extra, **kwargs)


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.0, "low"), (0.5999, "low"), (0.6, "medium"), (0.7499, "medium"), (0.75, "high"), (1.0, "high")],
)
def test_level_boundaries_higher_is_worse(value, expected):
    assert level_of(value, Threshold(risk="membership", medium=0.6, high=0.75)) == expected


@pytest.mark.parametrize(
    ("value", "expected"), [(0.9, "low"), (0.5, "medium"), (0.4, "medium"), (0.2, "high")]
)
def test_level_boundaries_lower_is_worse(value, expected):
    threshold = Threshold(risk="robustness", medium=0.5, high=0.2, higher_is_worse=False)
    assert level_of(value, threshold) == expected


def test_threshold_order_is_checked():
    with pytest.raises(ValueError, match="medium=0.9 must be <= high=0.5"):
        Threshold(risk="x", medium=0.9, high=0.5)


def test_risk_verdict_is_the_worst_metric():
    def m(metric: str, level: str) -> Measurement:
        return Measurement(
            entry="e", attack="a", metric=metric, risk="membership", value=0.0, ci_low=None, ci_high=None,
            ci_method="none", n_seeds=1, level=level,
        )  # fmt: skip

    (verdict,) = risk_verdicts([m("mia_auc", "low"), m("mia_tpr_at_1pct_fpr", "medium")])
    assert verdict.level == "medium"


# --------------------------------------------------------------------------- intervals


def test_wilson_interval_hand_value():
    # p = 0.5, n = 100, z = 1.959964: centre 0.5, half-width 1.96 * sqrt(0.0025 + z^2/40000) / (1 + z^2/100)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.40383, abs=1e-4)
    assert high == pytest.approx(0.59617, abs=1e-4)


@pytest.mark.filterwarnings("ignore:only .* non-members")
def test_scores_from_roc_keeps_the_ranking():
    rng = np.random.default_rng(0)
    members = np.r_[np.ones(40, int), np.zeros(60, int)]
    scores = np.round(rng.normal(members * 0.8, 1.0), 1)  # rounding makes ties
    roc = roc_metrics(scores, members, fpr_levels=(0.01, 0.1))
    rows = scores_from_roc(roc["fpr"], roc["tpr"], 40, 60)
    assert len(rows) == 100 and rows[:, 1].sum() == 40
    assert roc_auc_score(rows[:, 1], rows[:, 0]) == pytest.approx(roc_auc_score(members, scores))
    again = roc_metrics(rows[:, 0], rows[:, 1].astype(int), fpr_levels=(0.01, 0.1))
    assert again["tpr_at_fpr"] == roc["tpr_at_fpr"]


def _membership_result(separation: float, n: int = 100, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    members = np.r_[np.ones(n, int), np.zeros(n, int)]
    scores = rng.normal(members * separation, 1.0)
    roc = roc_metrics(scores, members)
    tpr_at_fpr = {str(k): v for k, v in roc["tpr_at_fpr"].items()}
    entry = {"attack": "loss", "auc": roc["auc"], "tpr_at_fpr": tpr_at_fpr, "roc_fpr": roc["fpr"]}
    return {"attacks": [{**entry, "roc_tpr": roc["tpr"], "n_members": n, "n_nonmembers": n}]}


@pytest.mark.filterwarnings("ignore:only .* non-members")
def test_membership_metrics_and_bootstrap_interval():
    result = _membership_result(2.0)
    values = run_values("membership", result, {}, samples=200)
    auc = values["mia_auc"]
    assert auc.value == pytest.approx(result["attacks"][0]["auc"])
    assert auc.ci_low < auc.value < auc.ci_high
    assert 0.8 < auc.ci_low and auc.ci_high <= 1.0  # separation 2 sigma: AUC ~0.92
    assert values["mia_tpr_at_1pct_fpr"].note is None  # 100 non-members: 1% FPR is one false positive
    few = run_values("membership", _membership_result(2.0, n=50), {}, samples=50)["mia_tpr_at_1pct_fpr"]
    assert "only 50 non-members" in few.note
    null = run_values("membership", _membership_result(0.0), {}, samples=200)["mia_auc"]
    assert null.ci_low < 0.5 + 0.1 and null.ci_high > 0.5 - 0.1


def test_memorization_metric_is_the_largest_exposure():
    result = {
        "exposure": [
            {"exposure": 2.0, "estimate": None},
            {"exposure": None, "estimate": {"value": 7.5}},
            {"exposure": 9.9, "estimate": None},
        ]
    }
    value = run_values("memorization", result, {}, samples=100)["max_exposure_bits"]
    assert value.value == 9.9
    assert value.ci_low >= 2.0 and value.ci_high == 9.9


def test_extra_metric_path_and_bad_path():
    result = {"bias": {"amplification": 0.3}, "ece": 0.07}
    values = run_values("bias_cascade", result, {"bias_gap": "bias.amplification"})
    assert values["bias_gap"].value == 0.3 and values["ece"].value == 0.07
    with pytest.raises(KeyError, match="no 'missing'"):
        run_values("bias_cascade", result, {"bias_gap": "bias.missing"})


def _rates(model: str, objective: str | None, in_domain: list[bool]):
    from attacks.bias_cascade import ModelRates
    from secure_kd.proportions import Rate

    return ModelRates(
        model=model, objective=objective, in_domain=Rate.of(in_domain), out_of_domain=Rate.of([False] * 10),
        samples=[],
    )  # fmt: skip


def test_bias_cascade_metric_is_the_worst_students_rate_with_a_wilson_interval():
    from attacks.bias_cascade import BiasCascadeResult

    rows = [
        _rates("clean_teacher", None, [False] * 40),
        _rates("teacher", None, [True] * 8 + [False] * 32),
        _rates("student_forward_kl", "forward_kl", [True] * 1 + [False] * 39),
        _rates("student_seq_kd", "seq_kd", [True] * 6 + [False] * 34),
    ]
    result = BiasCascadeResult(
        behaviour="targeted_brand", payload="Zyntra", poison_rate=0.1, n_instructions=100, n_poisoned=10,
        target_topic="support", teacher_source="tiny", rows=rows, amplification={}, seconds=1.0,
    ).model_dump(mode="json")  # fmt: skip
    value = run_values("bias_cascade", result, {})["bias_student_rate"]
    assert value.value == pytest.approx(6 / 40)  # the seq_kd student, not the teacher's 8/40
    assert (value.ci_low, value.ci_high) == pytest.approx(wilson_interval(6, 40))
    assert "student_seq_kd" in value.note and "0.200" in value.note
    assert level_of(value.value, DEFAULT_THRESHOLDS["bias_student_rate"]) == "high"
    assert run_values("bias_cascade", {**result, "rows": rows_without_students(result)}, {}) == {}


def rows_without_students(result: dict) -> list[dict]:
    return [row for row in result["rows"] if row["objective"] is None]


def test_federated_metrics_loss_increase_backdoor_and_inversion():
    from attacks.federated import FederatedAttackResult, InversionReport, RunOutcome

    def outcome(loss: float, asr: float | None = None) -> RunOutcome:
        return RunOutcome(
            test_loss=loss,
            perplexity=float(np.exp(loss)),
            honest_test_loss=loss,
            backdoor_asr=asr,
            seconds=1.0,
        )

    visible = InversionReport(
        protection="plaintext", update_visible=True, recovered_tokens=30, true_tokens=40, precision=1.0,
        recall=0.75, note="",
    )  # fmt: skip
    result = FederatedAttackResult(
        kind="backdoor", mode="fedavg", protection="plaintext", adversary_org="org-2",
        honest=outcome(3.8), attacked=outcome(4.3, asr=0.44), loss_increase=0.5, inversion=visible,
        seconds=1.0,
    ).model_dump(mode="json")  # fmt: skip
    values = run_values("federated", result, {})
    thresholds = DEFAULT_THRESHOLDS
    assert values["poisoning_loss_increase"].value == 0.5
    assert level_of(0.5, thresholds["poisoning_loss_increase"]) == "medium"
    assert values["backdoor_asr"].value == 0.44
    recall = values["update_token_recall"]
    assert recall.value == 0.75 and (recall.ci_low, recall.ci_high) == pytest.approx(wilson_interval(30, 40))
    hidden = {**result, "inversion": InversionReport(protection="ckks", update_visible=False, note="hidden")
              .model_dump(mode="json"), "attacked": outcome(4.3).model_dump(mode="json")}  # fmt: skip
    values = run_values("federated", hidden, {})
    assert values["update_token_recall"].value == 0.0 and "backdoor_asr" not in values


# --------------------------------------------------------------------------- orchestration


class FakeConfig(PluginConfig):
    out: str = "runs/fake"
    device: str = "cpu"
    value: float = 0.1
    crash: bool = False


class FakeResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    ece: float


class Counter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def plugin(self, name: str) -> Plugin:
        def run(cfg: FakeConfig) -> FakeResult:
            self.calls.append((name, cfg.seed))
            if cfg.crash:
                raise RuntimeError("planted crash")
            result = FakeResult(ece=cfg.value)
            write_result(cfg.out, result)
            return result

        return Plugin(name=name, Config=FakeConfig, Result=FakeResult, run=run, summary="fake")

    def get(self, name: str) -> Plugin:
        if name.startswith("fake"):
            return self.plugin(name)
        raise KeyError(f"unknown attack {name!r}")


def _audit(tmp_path: Path, suite: list[dict], **extra) -> AuditConfig:
    return AuditConfig.model_validate(
        {"out": str(tmp_path / "audit"), "suite": suite, "progress": False, **extra}
    )


def test_failed_attack_is_reported_and_others_kept(tmp_path):
    counter = Counter()
    config = _audit(
        tmp_path,
        [
            {"attack": "fake_ok", "config": {"value": 0.2}},
            {"attack": "fake_crash", "config": {"crash": True}},
            {"attack": "fake_badconfig", "config": {"nope": 1}},
            {"attack": "no_such_attack"},
            {"attack": "fake_ok", "id": "after", "config": {"value": 0.01}},
        ],
    )
    result = run_audit(config, get_plugin=counter.get)
    status = {e.id: e.status for e in result.entries}
    assert status == {
        "fake_ok": "ok",
        "fake_crash": "failed",
        "fake_badconfig": "failed",
        "no_such_attack": "failed",
        "after": "ok",
    }
    errors = {e.id: e.runs[0].error for e in result.entries}
    assert "planted crash" in errors["fake_crash"]
    assert "nope" in errors["fake_badconfig"]
    assert "no_such_attack" in errors["no_such_attack"]
    assert result.failed == ["fake_crash", "fake_badconfig", "no_such_attack"]
    (verdict,) = result.verdicts  # ece from the two ok runs: 0.2 -> high, 0.01 -> low
    assert verdict.risk == "calibration" and verdict.level == "high"
    saved = json.loads((tmp_path / "audit" / "results.json").read_text())
    assert saved["failed"] == result.failed
    html = (tmp_path / "audit" / "report.html").read_text()
    assert "planted crash" in html and "fake_badconfig" in html
    record = json.loads(
        (tmp_path / "audit" / "attacks" / "fake_crash" / "seed0" / "audit_run.json").read_text()
    )
    assert record["status"] == "failed" and "RuntimeError" in record["traceback"]


def test_resume_skips_finished_runs(tmp_path):
    counter = Counter()
    suite = [
        {"attack": "fake_a", "seeds": [0, 1, 2]},
        {"attack": "fake_b", "config": {"crash": True}},
    ]
    run_audit(_audit(tmp_path, suite), get_plugin=counter.get)
    assert len(counter.calls) == 4
    counter.calls.clear()
    result = run_audit(_audit(tmp_path, suite), get_plugin=counter.get, resume=True)
    assert counter.calls == [("fake_b", 0)]  # finished runs skipped, the failed one retried
    assert all(r.resumed for r in result.entries[0].runs)
    (measurement,) = result.measurements
    assert measurement.n_seeds == 3 and measurement.ci_method == "bootstrap over 3 seeds"
    counter.calls.clear()
    suite[0]["config"] = {"value": 0.3}  # a changed config is not "finished"
    run_audit(_audit(tmp_path, suite), get_plugin=counter.get, resume=True)
    assert sorted(counter.calls) == [("fake_a", 0), ("fake_a", 1), ("fake_a", 2), ("fake_b", 0)]
    counter.calls.clear()
    run_audit(_audit(tmp_path, suite), get_plugin=counter.get)  # no --resume: everything again
    assert len(counter.calls) == 4


def _result_with(levels: list[str], failed: list[str]) -> AuditResult:
    measurements = [
        Measurement(
            entry=f"e{i}", attack="a", metric="m", risk=f"risk{i}", value=0.0, ci_low=None, ci_high=None,
            ci_method="none", n_seeds=1, level=level,
        )
        for i, level in enumerate(levels)
    ]  # fmt: skip
    return AuditResult(
        model=None, teacher=None, data=None, entries=[], measurements=measurements,
        verdicts=risk_verdicts(measurements), overall=None, failed=failed, config={}, provenance={},
        privacy_ledger=[], seconds=0.0,
    )  # fmt: skip


def test_gate_exit_codes():
    assert gate(_result_with(["medium"], []), None) == (0, [])
    assert gate(_result_with(["medium"], []), "high") == (0, [])
    code, lines = gate(_result_with(["low", "medium"], []), "medium")
    assert code == 3 and lines == ["audit gate: risk risk1 is medium (at or above --fail-on medium)"]
    assert gate(_result_with(["high"], []), "high")[0] == 3
    assert gate(_result_with(["low"], []), "low")[0] == 3
    code, lines = gate(_result_with(["low"], ["clone"]), "high")
    assert code == 4 and "clone" in lines[0]
    code, lines = gate(_result_with(["low"], ["clone"]), None)  # a failure fails the job without --fail-on
    assert code == 4 and lines[0] == "audit incomplete: these attacks failed: clone"


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ids must be unique"):
        AuditConfig.model_validate({"suite": [{"attack": "clone"}, {"attack": "clone"}]})
    with pytest.raises(ValueError, match="no threshold"):
        AuditConfig.model_validate({"suite": [{"attack": "x", "metrics": {"unknown_metric": "a.b"}}]})
    with pytest.raises(ValueError, match="no `teacher`"):
        AuditConfig.model_validate({"suite": [{"attack": "clone", "target": "teacher"}]})


def _hf_dir(path: Path, architecture: str = "LlamaForCausalLM") -> Path:
    """A directory that reads as a Hugging Face model (config.json only: nothing here loads weights)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "llama"}))
    return path


def test_model_and_budget_go_into_each_attack_field(tmp_path):
    records = tmp_path / "d.jsonl"
    records.write_text('{"text": "a"}\n')
    model = _hf_dir(tmp_path / "m")
    config = AuditConfig.model_validate(
        {
            "model": str(model),
            "data": str(records),
            "suite": [{"attack": "clone", "budget": 77}, {"attack": "membership"}],
        }
    )
    clone = attack_config(config, config.suite[0], 5, tmp_path / "o", get_attack("clone"))
    assert clone["victim"]["source"] == str(model) and clone["query_budget"] == 77 and clone["seed"] == 5
    assert clone["victim_logit_scale"] == 1.0  # the sharpening of a random tiny victim is not for a real one
    membership = attack_config(config, config.suite[1], 0, tmp_path / "o", get_attack("membership"))
    assert membership["target"]["source"] == str(model) and membership["tokenizer"] is None
    assert membership["data"] == {"source": "files", "members": str(records)}


def test_an_audit_of_a_model_that_does_not_exist_is_refused(tmp_path):
    """Issue 13: `--model` naming nothing used to run every attack on its own target and say 'low'."""
    for name, expected in ((tmp_path / "nope", "does not exist"), (tmp_path, "holds no model")):
        with pytest.raises(ValueError, match=expected):
            AuditConfig.model_validate({"model": str(name), "suite": [{"attack": "clone"}]})
    suite = str(ROOT / "configs/audit.yaml")
    args = [
        "audit",
        "-c",
        suite,
        "--model",
        str(tmp_path / "nope"),
        "--no-progress",
        "-o",
        str(tmp_path / "o"),
    ]
    done = runner.invoke(app, args)
    assert done.exit_code == 2, done.output
    assert "does not exist" in done.output and not (tmp_path / "o").exists()


def test_default_suite_configs_validate(monkeypatch):
    """Every entry of the shipped audit suites makes a valid config for its attack (no run)."""
    from attacks import get_attack

    monkeypatch.chdir(ROOT)
    for path in ("configs/audit.yaml", "configs/audit-smollm2.yaml", "configs/audit-scenarios.yaml"):
        config = load_config(path, [], AuditConfig)
        for entry in config.suite:
            raw = attack_config(config, entry, config.seed, Path("/tmp/unused"), get_attack(entry.attack))
            if config.model == "smollm2" and "victim" not in raw:
                continue  # resolved to the converted asset's directory, absent on a fresh machine
            get_attack(entry.attack).Config.model_validate(raw)


# --------------------------------------------------------------------------- CLI


def test_cli_audit_refuses_unknown_attacks_and_key_typos_before_running(tmp_path, monkeypatch):
    """Issue 19: an unknown attack name or a key typo used to fail inside the run and exit 0."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "audit"
    suite = (
        "[{attack: logit_leak, config_file: configs/attacks/logit_leak.yaml}, {attack: no_such_attack}, "
        "{attack: logit_leak, id: typo, config_file: configs/attacks/logit_leak.yaml, config: {stpe: 4}}]"
    )
    args = ["audit", "-c", "configs/audit.yaml", "--set", f"suite={suite}", "-o", str(out), "--no-progress"]
    done = runner.invoke(app, args)
    assert done.exit_code == 2, done.output
    text = " ".join(done.output.split())
    assert "suite[1] no_such_attack: lookup: unknown attack 'no_such_attack'" in text
    assert "suite[2] typo: config: invalid logit_leak config: stpe: Extra inputs are not permitted" in text
    assert not out.exists()  # nothing ran, nothing half-written
    checked = runner.invoke(app, ["validate", "configs/audit.yaml", "--set", f"suite={suite}"])
    assert checked.exit_code == 2 and "no_such_attack" in checked.output and "stpe" in checked.output


def test_cli_audit_fail_on_incomplete_and_report(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "audit"
    members = tmp_path / "members.jsonl"
    members.write_text('{"body": "no text field here"}\n')  # passes the config check, fails in the run
    suite = (
        "[{attack: logit_leak, config_file: configs/attacks/logit_leak.yaml}, {attack: membership, "
        f"config: {{attacks: [loss], n_shadows: 0, data: {{source: files, members: {members}, "
        f"nonmembers: {members}}}}}}}]"
    )
    args = [
        "audit",
        "-c",
        "configs/audit.yaml",
        "--set",
        f"suite={suite}",
        "--out",
        str(out),
        "--no-progress",
    ]
    done = runner.invoke(app, args)
    assert done.exit_code == 4, done.output  # no --fail-on: an attack that failed still fails the job
    text = " ".join(done.output.split())
    assert "audit incomplete: these attacks failed: membership" in text
    assert (
        "failed: membership (entry membership, stage run): ValueError:" in text and "no field 'text'" in text
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved["failed"] == ["membership"]
    assert saved["entries"][1]["runs"][0]["stage"] == "run"
    assert saved["entries"][0]["runs"][0]["result"]["correct"] is True
    assert saved["entries"][0]["ran_on"] == "a tiny random Llama"  # no --model: each attack's own target
    done = runner.invoke(app, [*args, "--resume", "--fail-on", "high"])
    assert done.exit_code == 3, done.output
    assert "risk model_extraction is high" in done.output  # a tiny RMSNorm Llama leaks its width
    (out / "report.html").unlink()
    rendered = runner.invoke(app, ["report", str(out)])
    assert rendered.exit_code == 0 and (out / "report.html").is_file()
    high_bar = [
        *args,
        "--resume",
        "--set",
        "thresholds={logit_leak_gap_decades: {risk: model_extraction, medium: 50, high: 99}}",
    ]
    done = runner.invoke(app, [*high_bar, "--fail-on", "medium"])
    assert done.exit_code == 4, done.output  # no risk at medium, but an attack failed
    assert "no risk at or above --fail-on medium, but these attacks failed: membership" in done.output
    bad = runner.invoke(app, [*args, "--fail-on", "severe"])
    assert bad.exit_code == 2 and "fail_on" in bad.output


def test_cli_report_on_a_non_audit_dir(tmp_path):
    done = runner.invoke(app, ["report", str(tmp_path)])
    assert done.exit_code == 2 and "does not exist" in done.output
    with pytest.raises(ConfigError):
        load_config(None, ["suite=[]"], AuditConfig)
