"""`secure-kd federate-export`: one organization's federated student and records, ready for an audit."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from rich.console import Console
from test_federation_apps import federate, tiny_job
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from federation.client.workspace import OrgWorkspace
from federation.export import export_student
from federation.job_data import job_data
from federation.partition import job_corpus
from secure_kd.app.cli import app
from secure_kd.data.synthetic import SyntheticCorpus


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fed")
    job = tiny_job(
        tmp_path,
        n_organizations=2,
        data={
            "synthetic": {"n_records": 90, "n_canaries": 2, "canary_repeats": 3},
            "heldout_fraction": 0.1,
            "max_length": 24,
        },
    )
    federate(job)
    run = tmp_path / "run"
    (run / "job.json").write_text(json.dumps(job.model_dump(mode="json")))  # as run_federation writes it
    return job, run


def test_exported_student_and_records_are_the_organizations_own(finished_run, tmp_path):
    job, run = finished_run
    exported = export_student(run, "org-1", tmp_path / "export")
    ws = OrgWorkspace(job, 1, run / "orgs" / "org-1")
    # the directory loads with plain transformers and computes what the workspace's student computes
    model = AutoModelForCausalLM.from_pretrained(exported.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported.model_dir)
    ids = torch.tensor([ws.train_examples[0].input_ids])
    with torch.no_grad():
        expected = ws.student().eval()(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    assert len(tokenizer) == job_data(job).vocab_size

    members = SyntheticCorpus.from_jsonl(exported.members)
    assert [r["record_id"] for r in members.records] == [r["record_id"] for r in ws.own_data.train]
    member_ids = {r["record_id"] for r in members.records}
    full = {c.prefix: c for c in job_corpus(job).canaries}
    for canary in members.canaries:  # only the canaries this organization holds, with its own ids
        assert set(canary.record_ids) <= member_ids and canary.repeats == len(canary.record_ids)
        assert set(canary.record_ids) == set(full[canary.prefix].record_ids) & member_ids
    held = sum(bool(set(c.record_ids) & member_ids) for c in full.values())
    assert exported.canaries == len(members.canaries) == held >= 1

    nonmembers = [json.loads(line) for line in open(exported.nonmembers)]
    transfer_ids = {r["record_id"] for r in job_data(job).split.transfer}
    assert {r["record_id"] for r in nonmembers}.isdisjoint(member_ids | transfer_ids)
    assert len(nonmembers) == exported.n_nonmembers > 0


def test_export_errors_name_the_problem(finished_run, tmp_path):
    job, run = finished_run
    with pytest.raises(ValueError, match="not one of this run's organizations"):
        export_student(run, "mallory", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="job.json does not exist"):
        export_student(tmp_path, "org-0", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no trained student yet"):
        export_student(run, "org-0", tmp_path / "x", org_dir=tmp_path / "empty")


def test_cli_federate_export(finished_run, tmp_path):
    _, run = finished_run
    result = CliRunner().invoke(
        app, ["federate-export", str(run), "--org", "0", "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "export.json").read_text())["org"] == "org-0"
    bad = CliRunner().invoke(
        app, ["federate-export", str(tmp_path), "--org", "0", "--out", str(tmp_path / "f")]
    )
    assert bad.exit_code == 2 and "job.json does not exist" in bad.output


def test_the_demo_audits_the_exported_student(finished_run, tmp_path):
    from sklearn.metrics import auc

    from secure_kd.app.demo_story import _audit_federated
    from secure_kd.data.synthetic import generate_corpus

    _, run = finished_run
    heldout = tmp_path / "heldout.jsonl"
    generate_corpus(16, seed=1, n_canaries=0).to_jsonl(heldout)  # records nobody trained on
    audit, heldout_perplexity = _audit_federated(tmp_path, run, heldout, Console(quiet=True))
    assert audit.failed == []
    assert 1.0 < heldout_perplexity < 1e6  # the exported student on the demo's held-out records
    assert sorted(e.attack for e in audit.entries) == ["membership", "memorization"]
    metrics = {m.metric: m.value for m in audit.measurements}
    assert {"max_exposure_bits", "mia_auc"} <= set(metrics)
    exported = json.loads((tmp_path / "export" / "export.json").read_text())
    assert exported["canaries"] >= 1
    # the verdict's AUC is the loss attack's, which is the area under its stored ROC curve
    membership = next(e for e in audit.entries if e.attack == "membership").runs[0].result
    loss = next(a for a in membership["attacks"] if a["attack"] == "loss")
    assert loss["n_members"] == exported["n_members"]
    assert (tmp_path / "audit" / "report.html").is_file()
    assert metrics["mia_auc"] == pytest.approx(loss["auc"])
    assert loss["auc"] == pytest.approx(auc(loss["roc_fpr"], loss["roc_tpr"]), abs=0.01)  # curve is thinned


def _mode(path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_every_exported_file_is_private_whatever_the_umask(finished_run, tmp_path):
    _, run = finished_run
    umask = os.umask(0o022)
    try:
        export_student(run, "org-0", tmp_path / "export")
    finally:
        os.umask(umask)
    paths = [tmp_path / "export", *(tmp_path / "export").rglob("*")]
    assert {p.name for p in paths} >= {"model", "members.jsonl", "members.canaries.json", "nonmembers.jsonl"}
    loose = {str(p): oct(_mode(p)) for p in paths if _mode(p) != (0o700 if p.is_dir() else 0o600)}
    assert loose == {}


def test_an_existing_empty_out_is_tightened_and_a_non_empty_one_refused(finished_run, tmp_path):
    _, run = finished_run
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    empty.chmod(0o755)
    export_student(run, "org-0", empty)
    assert _mode(empty) == 0o700 and (empty / "export.json").is_file()

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "notes.txt").write_text("someone else's file")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export_student(run, "org-0", shared)
    assert _mode(shared) == 0o755 and sorted(p.name for p in shared.iterdir()) == ["notes.txt"]  # untouched
    result = CliRunner().invoke(app, ["federate-export", str(run), "--org", "0", "--out", str(shared)])
    assert result.exit_code == 2 and "not empty" in result.output


def test_simulated_organization_directories_are_private(finished_run):
    job, run = finished_run
    for index in range(job.n_organizations):
        root = run / "orgs" / job.org_name(index)
        assert _mode(root) == 0o700, root  # created 0755 as the parent of keys/ before the run
    loose = run / "orgs" / job.org_name(0)
    loose.chmod(0o755)
    OrgWorkspace(job, 0, loose)
    assert _mode(loose) == 0o700  # an existing directory is tightened, not left as found
    assert _mode(run) == 0o700 and _mode(run / "results.json") == 0o600  # server results: 0644 before
