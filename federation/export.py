"""One organization's federated student, exported for an audit (`secure-kd federate-export`).

A finished federated run keeps each organization's student as raw weights in its directory
(`<out>/orgs/<org>/student.safetensors`) and its records nowhere but in the job. An audit needs a model
directory and the records it was trained on, so this writes, under `out`:

    model/             the student as a Hugging Face directory (LoRA merged) with the job's tokenizer
    members.jsonl      the organization's training records; with the job's synthetic corpus, the
                       canaries it holds go into the sidecar members.canaries.json, so the memorization
                       audit measures exactly those
    nonmembers.jsonl   records no organization trained on: the public test set and the organization's
                       own held-out records (the transfer set is excluded: every student saw its inputs)
    export.json        which run, organization and files

Run on the machine that holds the organization's directory: the records and the student are its own,
so `out` is created readable by its owner only (directories 0700, files 0600). An existing `out` must
be an empty directory: an export never mixes with, or loosens, files already there.
`secure-kd audit --model <out>/model --data <out>/members.jsonl` then audits the student.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from federation.client.workspace import STUDENT_FILE, OrgWorkspace
from federation.config import FederatedJob, load_federated_job
from federation.partition import job_corpus
from secure_kd.data.synthetic import SyntheticCorpus
from secure_kd.paths import (
    PRIVATE_FILE_MODE,
    atomic_write_json,
    atomic_write_text,
    chmod_private_tree,
    private_dir,
)


class ExportedStudent(BaseModel):
    run: str
    org: str
    model_dir: str
    members: str
    nonmembers: str
    n_members: int
    n_nonmembers: int
    canaries: int


def _org_index(job: FederatedJob, org: str) -> int:
    names = [job.org_name(i) for i in range(job.n_organizations)]
    if org in names:
        return names.index(org)
    if org.isdigit() and int(org) < job.n_organizations:
        return int(org)
    raise ValueError(f"organization {org!r} is not one of this run's organizations {names} (or an index)")


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text, mode=PRIVATE_FILE_MODE)


def _members_corpus(job: FederatedJob, train: list[dict[str, Any]]) -> SyntheticCorpus | None:
    """The organization's training records with the canaries it holds (ids and repeats restricted)."""
    corpus = job_corpus(job)
    if corpus is None:
        return None
    held = {r["record_id"] for r in train}
    canaries = []
    for canary in corpus.canaries:
        ids = tuple(i for i in canary.record_ids if i in held)
        if ids:
            canaries.append(replace(canary, record_ids=ids, repeats=len(ids)))
    return SyntheticCorpus(
        records=train,
        canaries=canaries,
        secret_digits=corpus.secret_digits,
        canary_format=corpus.canary_format,
        seed=corpus.seed,
    )


def org_with_most_canaries(job: FederatedJob) -> str:
    """The organization whose training records hold the most canaries (ties: the lowest index)."""
    from federation.job_data import job_data

    counts = [0] * job.n_organizations
    for owners in job_data(job).split.canary_owners.values():
        for index in owners:
            counts[index] += 1
    return job.org_name(max(range(job.n_organizations), key=lambda i: (counts[i], -i)))


def _fresh_out(out: Path) -> Path:
    """`out` as a new private directory; an existing one must be an empty directory (then tightened)."""
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise ValueError(
                f"--out {out} exists and is not a directory: give a new directory for the export"
            )
        if any(out.iterdir()):
            raise ValueError(
                f"--out {out} already exists and is not empty: an export writes the organization's private "
                "records and would mix with (and change the modes of) what is there. Give a new directory, "
                "or remove this one first if it is an earlier export you no longer need"
            )
    return private_dir(out)


def export_student(run_dir: str | Path, org: str, out: str | Path, *, org_dir: str | Path | None = None):
    """Export organization `org` (name or index) of the finished run in `run_dir` to `out`."""
    run_dir, out = Path(run_dir), Path(out)
    job_file = run_dir / "job.json"
    if not job_file.is_file():
        raise FileNotFoundError(
            f"{job_file} does not exist: give the `out` directory of a `secure-kd federate` run"
        )
    job = load_federated_job(job_file)
    index = _org_index(job, org)
    root = Path(org_dir) if org_dir is not None else run_dir / "orgs" / job.org_name(index)
    if not (root / STUDENT_FILE).is_file():
        raise FileNotFoundError(
            f"{root / STUDENT_FILE} does not exist: the organization has no trained student yet (run the "
            "federation to the end first, or give --org-dir where its directory lives)"
        )
    ws = OrgWorkspace(job, index, root)
    _fresh_out(out)  # it holds the organization's private records, like its own directory
    model = ws.student().eval()
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    model_dir = out / "model"
    merged.save_pretrained(model_dir, safe_serialization=True)
    ws.public.tokenizer.save_pretrained(model_dir)

    own = ws.own_data
    members_path = out / "members.jsonl"
    corpus = _members_corpus(job, own.train) if ws.data_path is None else None
    if corpus is not None:
        corpus.to_jsonl(members_path)
    else:
        _write_jsonl(members_path, own.train)
    nonmembers = ws.public.split.test + own.heldout
    _write_jsonl(out / "nonmembers.jsonl", nonmembers)
    exported = ExportedStudent(
        run=str(run_dir),
        org=ws.name,
        model_dir=str(model_dir),
        members=str(members_path),
        nonmembers=str(out / "nonmembers.jsonl"),
        n_members=len(own.train),
        n_nonmembers=len(nonmembers),
        canaries=len(corpus.canaries) if corpus is not None else 0,
    )
    atomic_write_json(out / "export.json", exported.model_dump(mode="json"), mode=PRIVATE_FILE_MODE)
    chmod_private_tree(out)  # the model directory and the corpus files were written with the umask's modes
    return exported
