"""One organization's side of a federated job: its directory, data, models, keys and privacy ledger.

Everything a ClientApp must remember between messages lives on the organization's disk (in
simulation `<out>/orgs/org-<i>/`, in deployment the SuperNode's `org-dir` node-config entry), never
in the server's messages:

    student.safetensors   the current student: its weights with tied ones stored once, or a LoRA
                          student's adapter only (`federation.client.student_store`)
    keys/                 the organization's Ed25519 identity and X25519 key-exchange keys (0600)
    ckks-secret.bin       the shared CKKS secret context, after the key ceremony (0600)
    state.json            small bookkeeping (calibrated DP noise, last losses, profile releases)

The DP ledger is per dataset (a fingerprint of all the organization's records, before its
train/held-out cut) in the engine's ledger
directory (`train.privacy.ledger_dir`, the node-config entry `ledger-dir`, or
`$SECURE_KD_HOME/privacy-ledgers`), so epsilon adds up across rounds and across runs.

Public inputs (the tokenizer, the test and transfer sets) are derived from the job alone, so every
organization computes the same ones; `job_data` caches them per process.
"""

from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from federation.client.student_store import load_student_file, save_student_file
from federation.config import FederatedJob
from federation.crypto.identity import OrgKeys, TrustStore
from federation.job_data import JobData, organization_data, record_text
from federation.partition import OrganizationData, split_own_records
from federation.students import build_student, build_teacher
from secure_kd.data import TokenizedExample, load_records, tokenize_records
from secure_kd.dp.ledger import dataset_key
from secure_kd.models import resolve_device
from secure_kd.paths import atomic_write_bytes, atomic_write_json, private_dir

STUDENT_FILE = "student.safetensors"
SECRET_CONTEXT_FILE = "ckks-secret.bin"
STATE_FILE = "state.json"
# state.json keys that outlive a run: the record of every profile this organization released (p2p)
PERSISTENT_STATE = frozenset({"profile_ledger"})
KEYS_DIR = "keys"


def node_org_index(job: FederatedJob, node_config: dict[str, Any]) -> int:
    """Which organization a SuperNode is: node config `org-name` (one of `job.organizations`) or
    `partition-id` (simulation); when both are given they must agree."""
    index = int(node_config["partition-id"]) if "partition-id" in node_config else None
    name = node_config.get("org-name")
    if name is None:
        if index is None:
            raise ValueError("node config needs `org-name` (deployment) or `partition-id` (simulation)")
        return index
    names = [job.org_name(i) for i in range(job.n_organizations)]
    if name not in names:
        raise ValueError(f"node config org-name={name!r} is not an organization of this job ({names})")
    if index is not None and (not 0 <= index < len(names) or names[index] != name):
        raise ValueError(f"node config partition-id={index} and org-name={name!r} disagree: drop one")
    return names.index(name)


class OrgWorkspace:
    """Organization `index` of `job`, rooted at `root` (created 0700). With `data_path` (deployment:
    the SuperNode's `data-path` node config) its private records are that file, never the job's split."""

    def __init__(
        self,
        job: FederatedJob,
        index: int,
        root: str | Path,
        *,
        ledger_dir: str | None = None,
        data_path: str | None = None,
    ) -> None:
        if not 0 <= index < job.n_organizations:
            raise ValueError(f"organization index {index} is outside 0..{job.n_organizations - 1}")
        self.job, self.index, self.root = job, index, Path(root)
        private_dir(self.root)  # 0700, also when it exists (key generation creates it 0755 in simulation)
        self.name = job.org_name(index)
        self.ledger_dir = ledger_dir
        self.data_path = data_path
        self.device = resolve_device(job.device)

    # -- data ----------------------------------------------------------------------------------------
    @cached_property
    def public(self) -> JobData:
        """The public sets tokenized with this organization's tokenizer (its `organization_models` entry)."""
        return organization_data(self.job, self.index)

    @cached_property
    def own_data(self) -> OrganizationData:
        """This organization's records: its `data_path` file, or its partition of the job's corpus."""
        if self.data_path is None:
            return self.public.split.organizations[self.index]
        records = [dict(r) for r in load_records(self.data_path)]
        fraction = self.job.partition.heldout_fraction
        return split_own_records(records, fraction, seed=self.job.seed, org=self.index)

    @cached_property
    def private(self) -> tuple[list[TokenizedExample], list[TokenizedExample], list[str]]:
        """(training examples, held-out examples, training texts) of this organization."""
        own = self.own_data
        tokenize = dict(
            max_length=self.job.data.max_length,
            text_field=self.job.data.text_field,
            mask_prompt=self.job.data.mask_prompt,
        )
        train = tokenize_records(own.train, self.public.tokenizer, **tokenize)
        heldout = tokenize_records(own.heldout, self.public.tokenizer, **tokenize)
        if not train or not heldout:
            raise ValueError(
                f"{self.name} has {len(train)} training and {len(heldout)} held-out sequences after "
                "tokenization; give it more records (partition.min_records)"
            )
        return train, heldout, [record_text(r, self.job.data.text_field) for r in own.train]

    @property
    def train_examples(self) -> list[TokenizedExample]:
        return self.private[0]

    @property
    def heldout_examples(self) -> list[TokenizedExample]:
        return self.private[1]

    def topic_histogram(self) -> list[float]:
        own = self.own_data
        counts = own.label_histogram("topic")
        return [float(counts.get(label, 0)) for label in self.public.split.labels] or [1.0]

    @cached_property
    def data_fingerprint(self) -> str:
        """`dataset_key` of every record of this organization, before its seed-dependent train/held-out
        cut: a new seed or heldout_fraction on the same records draws on the same DP budget."""
        own = self.own_data
        return dataset_key([record_text(r, self.job.data.text_field) for r in own.train + own.heldout])

    @property
    def ledger_key(self) -> str:
        privacy = self.job.train.privacy
        if privacy is not None and privacy.ledger_key:
            return f"{privacy.ledger_key}-{self.name}"
        return self.data_fingerprint

    # -- models --------------------------------------------------------------------------------------
    def _build_student(self) -> nn.Module:
        layers = self.job.student_for(self.index).source == "teacher_layers"
        teacher = self.teacher if layers else None
        return build_student(self.job, self.index, self.public, teacher=teacher).to(self.device)

    def student(self) -> nn.Module:
        """The organization's student: the saved one, or a fresh (seeded) one in the first round."""
        model = self._build_student()
        path = self.root / STUDENT_FILE
        if path.is_file():
            load_student_file(model, path, device=self.device)
        model.train()
        return model

    def save_student(self, model: nn.Module) -> None:
        """Keep `model` for the next message: tied weights once, a LoRA student as its adapter."""
        save_student_file(model, self.root / STUDENT_FILE)

    @cached_property
    def teacher(self) -> nn.Module | None:
        teacher = build_teacher(self.job, self.public)
        return None if teacher is None else teacher.to(self.device)

    # -- keys and state --------------------------------------------------------------------------------
    @property
    def keys_dir(self) -> Path:
        return self.root / KEYS_DIR

    def keys(self) -> OrgKeys:
        """The organization's own keys, generated on its disk the first time (never sent anywhere)."""
        if not (self.keys_dir / "bundle.json").is_file():
            OrgKeys.generate(self.name).save(self.keys_dir)
        return OrgKeys.load(self.keys_dir)

    def trust(self, trust_dir: str | Path | None = None) -> TrustStore:
        """Identity keys registered out of band (`trust-dir` node config, default `<out>/trust`)."""
        return TrustStore.from_directory(trust_dir or Path(self.job.out) / "trust")

    def save_secret_context(self, data: bytes) -> None:
        """The run's CKKS secret, 0600, through a fresh temp name (never a fixed one a planted link
        could redirect)."""
        atomic_write_bytes(self.root / SECRET_CONTEXT_FILE, data, mode=0o600)

    def secret_context(self) -> bytes:
        path = self.root / SECRET_CONTEXT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.name} holds no CKKS key: it missed the key ceremony of this run")
        return path.read_bytes()

    def start_run(self) -> list[str]:
        """Forget what a previous run left here (its student, its CKKS key, its per-run state and scratch)
        so that a run never silently continues another; keys, trust and privacy ledgers stay (the
        profile ledger in state.json included). Returns what was removed."""
        removed = []
        for name in (STUDENT_FILE, SECRET_CONTEXT_FILE):
            path = self.root / name
            if path.is_file():
                path.unlink()
                removed.append(name)
        if (self.root / "work").is_dir():
            shutil.rmtree(self.root / "work")
            removed.append("work")
        state = self.state()
        kept = {key: value for key, value in state.items() if key in PERSISTENT_STATE}
        if kept != state:
            atomic_write_json(self.root / STATE_FILE, kept, mode=0o600)
            removed.extend(sorted(set(state) - set(kept)))
        return removed

    def state(self) -> dict[str, Any]:
        path = self.root / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_state(self, **values: Any) -> None:
        atomic_write_json(self.root / STATE_FILE, {**self.state(), **values}, mode=0o600)
