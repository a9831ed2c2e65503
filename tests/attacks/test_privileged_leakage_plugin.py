"""`secure-kd attack privileged_leakage` (attacks/privileged_leakage.py) from the CLI, with known answers:
a student fine-tuned on text holding the secrets ranks each first of its 1,000 candidates (exposure
log2 1000) and gives them back; a model never shown them stays near chance (E[log2(N/rank)] = 1.44 bits
for N = 1,000); the readings' intervals against a hand Wilson interval; secrets outside the privileged
context, or in no context, refused by line without the secret; the own tiny target runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.config import KDConfig, TinyModelConfig, TrainConfig
from secure_kd.data import TokenizedExample, train_tiny_tokenizer
from secure_kd.models import build_tiny
from secure_kd.trainer import fit_in_scratch

runner = CliRunner()
NAMES, SECRETS = ["kalomi", "rutesa", "poneda", "vizuda"], ["417", "089", "652", "930"]
TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)


def _prefix(name: str) -> str:
    return f"Q: code of {name}? A: the code of {name} is "


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("privileged")
    public = [
        f"Q: code of {n}? A: the code of {n} is {d}{d + 1}{d + 2}."
        for n in ("vida", "zufe")
        for d in range(7)
    ]
    tokenizer = train_tiny_tokenizer(public * 20, vocab_size=300)  # never saw the secrets
    records = [
        {
            "context": f"note: the code of {n} is {s}",
            "prompt": f"Q: code of {n}? A:",
            "completion": " on file.",
        }
        for n, s in zip(NAMES, SECRETS, strict=True)
    ]
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = [json.dumps({"prefix": _prefix(n), "secret": s}) for n, s in zip(NAMES, SECRETS, strict=True)]
    (root / "secrets.jsonl").write_text("\n".join(lines) + "\n")
    untrained = build_tiny(TINY, len(tokenizer), seed=0)
    trained = build_tiny(TINY, len(tokenizer), seed=0)
    examples = []
    for i, (n, s) in enumerate(zip(NAMES, SECRETS, strict=True)):
        ids = list(tokenizer(_prefix(n) + s + ".")["input_ids"]) + [tokenizer.eos_token_id]
        examples.append(TokenizedExample(ids, ids, i))
    fit_in_scratch(
        trained, examples, KDConfig(kd_weight=0.0, ce_weight=1.0, top_k=None),
        TrainConfig(max_steps=150, batch_size=4, lr=1e-2, schedule="constant"),
        pad_id=tokenizer.pad_token_id, seed=0, device="cpu",
    )  # fmt: skip
    for name, model in (("trained", trained), ("untrained", untrained)):
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
    return {k: root / k for k in ("trained", "untrained", "records.jsonl", "secrets.jsonl")} | {"root": root}


def _attack(world, out: Path, *sets: str):
    args = [
        "attack",
        "privileged_leakage",
        "-c",
        "configs/attacks/privileged_leakage.yaml",
        "--set",
        f"out={out}",
    ]
    for item in sets:
        args += ["--set", item]
    return runner.invoke(app, args)


def _given(world, target: str, reference: str | None) -> list[str]:
    return [
        f"target={world[target]}", f"reference={world[reference] if reference else 'null'}",
        f"data.records={world['records.jsonl']}", f"data.secrets={world['secrets.jsonl']}",
    ]  # fmt: skip


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_a_student_fine_tuned_on_the_secrets_leaks_them_all_and_the_untouched_reference_is_at_chance(
    world, tmp_path, monkeypatch
):
    from attacks import get_attack

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    done = _attack(world, tmp_path / "r", *_given(world, "trained", "untrained"))
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "r" / "results.json").read_text())
    assert result["n_canaries"] == 4 and result["n_records"] == 4
    assert all(c["exposure"] == pytest.approx(math.log2(1000)) for c in result["canaries"])  # rank 1 of 1000
    assert result["extracted"] == 4 and result["reference_extracted"] == 0
    chance = math.log2(1000) - math.lgamma(1001) / (1000 * math.log(2))  # mean of log2(1000/r), r = 1..1000
    assert result["chance_mean_exposure"] == pytest.approx(chance) and chance == pytest.approx(
        1.4355, abs=1e-3
    )
    assert result["reference_mean_exposure"] < 3.0
    assert all(c["contexts_holding_it"] == 1 for c in result["canaries"])
    text = (tmp_path / "r" / "results.json").read_text() + done.output
    assert not any(s in text for s in ("kalomi", "rutesa")) and '"417"' not in text  # no secret written
    readings = get_attack("privileged_leakage").measure(result, 200, 0.95)
    assert readings["privileged_exposure_bits"].value == pytest.approx(math.log2(1000))
    gain = readings["privileged_exposure_gain_bits"]
    assert gain.value == pytest.approx(math.log2(1000) - result["reference_mean_exposure"])
    assert gain.ci_low <= gain.value <= gain.ci_high
    rate = readings["privileged_extraction_rate"]
    assert rate.value == 1.0 and (rate.ci_low, rate.ci_high) == pytest.approx(_wilson(4, 4))


def test_a_model_never_shown_the_secrets_has_chance_exposure_and_no_gain_metric_without_reference(
    world, tmp_path, monkeypatch
):
    from attacks import get_attack

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    done = _attack(world, tmp_path / "u", *_given(world, "untrained", None))
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "u" / "results.json").read_text())
    assert result["extracted"] == 0 and result["reference_mean_exposure"] is None
    assert abs(result["mean_exposure"] - 1.44) < 1.5  # four canaries: one exposure's sd is about 1.4 bits
    readings = get_attack("privileged_leakage").measure(result, 200, 0.95)
    assert "privileged_exposure_gain_bits" not in readings
    assert readings["privileged_extraction_rate"].ci_high == pytest.approx(_wilson(0, 4)[1])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r[1].update(completion=" the code is 089."), "secret 2: it occurs in 1 record(s) outside"),
        (lambda r: r[2].update(context="note: nothing"), "secret 3: no record's 'context'"),
        (lambda r: r[0].update(context=""), "record 0 field 'context' (data.privileged_field) is empty"),
    ],
    ids=["in the student's input", "in no context", "empty privileged field"],
)
def test_secrets_not_placed_only_in_the_privileged_context_are_refused(
    world, tmp_path, monkeypatch, edit, message
):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    records = [json.loads(line) for line in world["records.jsonl"].read_text().splitlines()]
    edit(records)
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    sets = _given(world, "trained", None)
    sets[2] = f"data.records={path}"
    done = _attack(world, tmp_path / "x", *sets)
    assert done.exit_code == 2, done.output
    text = " ".join(done.output.split())
    assert message in text and "Traceback" not in text and "089" not in text
    assert not (tmp_path / "x" / "results.json").exists()


def test_a_given_student_without_records_or_secrets_and_a_trained_reference_are_refused(
    world, tmp_path, monkeypatch
):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    done = _attack(world, tmp_path / "y", f"target={world['trained']}", "reference=null")
    assert done.exit_code == 2 and "needs data.records and data.secrets" in " ".join(done.output.split())
    done = _attack(world, tmp_path / "y", *_given(world, "trained", None), "max_candidates=999")
    assert (
        done.exit_code == 2
        and "secret 1: its space has 1,000 candidates, above max_candidates=999"
        in " ".join(done.output.split())
    )
    done = _attack(world, tmp_path / "y", f"target={world['trained']}")
    assert done.exit_code == 2 and "reference: 'train' only goes with target: train" in " ".join(
        done.output.split()
    )


def test_the_own_tiny_target_runs_with_its_no_context_reference(tmp_path, monkeypatch):
    """target: train builds its own tiny world (pretrained copier, self_privileged student, no-context
    reference) and measures it; this short run is too weak to leak."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    sets = ["own.public_records=200", "own.pretrain_epochs=2", "own.private_records=6", "own.epochs=2"]
    done = _attack({}, tmp_path / "o", *sets)
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "o" / "results.json").read_text())
    assert result["n_canaries"] == 6 and result["target"] == "train" and result["own_target"]["epochs"] == 2.0
    assert result["reference_mean_exposure"] is not None and result["extracted"] <= 1


def test_it_runs_inside_secure_kd_audit_on_the_given_student_and_grades_the_leak_high(
    world, tmp_path, monkeypatch
):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    out = tmp_path / "audit"
    args = [
        "audit", "-c", "configs/audit.yaml", "--set", "suite=[{attack: privileged_leakage}]",
        "--model", str(world["trained"]), "--data", str(world["records.jsonl"]),
        "--secrets", str(world["secrets.jsonl"]), "-o", str(out), "--no-progress",
    ]  # fmt: skip
    done = runner.invoke(app, args)
    assert done.exit_code in (0, 3), done.output
    report = json.loads((out / "results.json").read_text())
    entry = report["entries"][0]
    assert entry["in_verdict"] and "(the audited model)" in entry["ran_on"]
    found = {m["metric"]: m for v in report["verdicts"] for m in v["measurements"]}
    exposure = found["privileged_exposure_bits"]
    assert exposure["value"] == pytest.approx(math.log2(1000)) and exposure["level"] == "high"
    assert exposure["risk"] == "memorization" and found["privileged_extraction_rate"]["level"] == "high"
    assert "privileged_exposure_gain_bits" not in found  # no reference given to the audit
