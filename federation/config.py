"""`secure-kd federate`: the pydantic model of a federated job (`FederatedJob`) and its loader.

A federated job reuses the engine's blocks (`student`, `teacher`, `data`, `kd`, `train` with its
`privacy` block for DP-SGD per client) and adds what the federation needs: how many organizations,
how many rounds, the mode (`fedavg`, `fed_distill`, `pate`, `p2p`), the protection of what crosses
the network (`plaintext`, `ckks`, `secagg+`), the split of the data between organizations, the
public transfer set, timeouts and a message size limit. Unknown keys are errors (`extra="forbid"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from federation.client_dp_config import ClientDPConfig
from federation.client_dp_config import problems as client_dp_problems
from federation.cross_tokenizer_config import OrganizationModel
from federation.cross_tokenizer_config import problems as cross_tokenizer_problems
from federation.roles import FEDAVG_KINDS, AdversaryConfig, FaultKind
from secure_kd.config import (
    SCHEMA_VERSION,
    DataConfig,
    KDConfig,
    ModelConfig,
    Strict,
    TrainConfig,
    load_config,
)

Mode = Literal["fedavg", "fed_distill", "pate", "p2p"]
Protection = Literal["plaintext", "ckks", "secagg+"]


class PartitionConfig(Strict):
    """How the private records are split between organizations.

    `iid`: a uniformly random split. `dirichlet`: for every label, the shares of the organizations
    are drawn from Dirichlet(alpha): small alpha (0.1) gives each organization a few labels, large
    alpha (100) approaches IID. Labels are the record's `topic` (`by: topic`); `by: canary_owner`
    also keeps every insertion of one canary in a single organization, its owner.
    """

    kind: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(1.0, gt=0, description="Dirichlet concentration (dirichlet only)")
    by: Literal["topic", "canary_owner"] = "topic"
    min_records: int = Field(4, ge=2, description="every organization gets at least this many records")
    heldout_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of each organization's records kept for its own evaluation"
    )


class FilteringConfig(Strict):
    """Client-side filtering of the transfer set (EdgeFD style, `federation.client.proxy_filter.ProxyFilter`).

    Each organization fits KMeans on features of its own records and gives weight 1 to the soft labels
    of transfer records within `density_ratio` times a cluster's radius, `floor_weight` to the others.
    The ensemble is the per-position weighted mean, so a record no organization keeps falls back to the
    plain mean (secure-kd's choice; EdgeFD drops it). Features: the mean of the student's input
    embeddings over a record's tokens (a random projection of its bag of tokens in round 1).
    """

    n_clusters: int = Field(4, ge=1)
    radius_quantile: float = Field(0.9, gt=0, le=1)
    density_ratio: float = Field(1.0, gt=0)
    floor_weight: float = Field(0.01, ge=0, le=1, description="weight of a record outside every cluster")


class TransferConfig(Strict):
    """The public transfer set (fed_distill, pate, p2p) and the shared layout of soft labels.

    Records are taken from the corpus before the private split, so no organization owns them. A soft
    label is a client's distribution at `index_k` token ids per position plus one tail bucket: the same
    `[positions, index_k + 1]` layout for every client (`federation.soft_labels`). The ids come from
    public inputs only: without `reference`, the `index_k` most frequent target tokens of the transfer
    set (one set for every position); with `reference`, each position's top-`index_k` under that public
    model (e.g. `{source: smollm2}`, the asset every participant holds) on the transfer text.
    """

    n_records: int = Field(24, ge=1)
    index_k: int = Field(64, ge=1, description="token ids per position in the shared soft-label layout")
    reference: ModelConfig | None = Field(
        None,
        description="a public model with the job's tokenizer whose per-position top-index_k forms the "
        "layout (every participant and the server load it); none: the transfer set's index_k most "
        "frequent target tokens for every position",
    )
    layout: Literal["auto", "tokens", "bytes"] = Field(
        "auto",
        description="fed_distill: tokens (index_k ids + tail), bytes (the byte-aligned layout of "
        "federation.byte_layout, index_k public bytes per span), auto: bytes across tokenizers, else tokens",
    )
    digest_steps: int = Field(8, ge=1, description="distillation steps on the aggregated soft labels")
    filtering: FilteringConfig | None = Field(
        None, description="fed_distill: weight each organization's soft labels by its own data density"
    )


class CkksConfig(Strict):
    """CKKS parameters are chosen per payload from these bounds (`federation.client.decrypt`).

    A decrypted mean is rounded before anything derived from it leaves a client, on a grid at least
    2**release_margin_bits above its noise bound; the keyring is chosen so that the grid is
    `release_decimals` decimals fine when the range allows it, and fewer decimals are released when not.
    """

    max_abs_update: float = Field(
        1.0e5,
        gt=0,
        description="bound on |weight * value| of one client (weight = number of examples); fed_distill "
        "payloads are probabilities, so it uses at most 1",
    )
    abs_error: float = Field(
        1.0e-6, gt=0, description="largest absolute error of a decrypted sum (the release may ask less)"
    )
    release_decimals: int = Field(
        6,
        ge=0,
        le=12,
        description="at most this many decimals of a decrypted value leave a client (fewer when the "
        "CKKS noise needs a coarser grid for the margin)",
    )
    release_margin_bits: int = Field(
        20, ge=20, le=40, description="the release grid is at least 2**this above the decryption noise"
    )


class SecAggConfig(Strict):
    """Flower's SecAgg+ (pairwise masking, tolerates dropouts); fedavg only.

    `num_shares` and `reconstruction_threshold` follow `SecAggPlusWorkflow`: an integer is a count, a
    number in (0, 1] a fraction (of the sampled clients, of num_shares).
    """

    num_shares: int | float = Field(
        1.0, gt=0, description="shares per secret: a count, or a fraction of clients"
    )
    reconstruction_threshold: int | float = Field(
        0.67, gt=0, description="shares that unmask a dropped client: a count, or a fraction of num_shares"
    )
    clipping_range: float = Field(
        8.0, gt=0, description="parameters are clipped to [-range, range], then quantized"
    )
    quantization_range: int = Field(1 << 22, gt=1)
    max_weight: float = Field(
        1000.0, gt=0, description="largest number of examples of one client; precision shrinks as it grows"
    )

    @model_validator(mode="after")
    def _counts_or_fractions(self) -> SecAggConfig:
        for name in ("num_shares", "reconstruction_threshold"):
            value = getattr(self, name)
            if isinstance(value, float) and value > 1:
                raise ValueError(f"secagg.{name}={value}: give an integer count or a fraction in (0, 1]")
        return self


class PateConfig(Strict):
    """PATE with the Gaussian noisy argmax (GNMax) of Papernot et al. (2018), data-independent accounting."""

    sigma: float = Field(
        2.0, gt=0, description="standard deviation of the Gaussian noise added to each vote count"
    )
    delta: float = Field(1.0e-5, gt=0, lt=1)
    student_steps: int = Field(
        16, ge=1, description="server-side student training steps on the released labels"
    )


class P2PConfig(Strict):
    """KNEXA-FL style orchestrated decentralization: the server pairs, peers exchange soft labels."""

    policy: Literal["linucb", "random"] = "linucb"
    alpha: float = Field(1.0, ge=0, description="LinUCB exploration weight")
    schedule: Literal["constant", "decay"] = "constant"
    beta0: float = Field(1.0, ge=0, description="decay schedule: alpha_t = beta0 / sqrt(t)")
    profile_epsilon: float = Field(1.0, gt=0, description="Laplace epsilon per profile release")
    gamma: float = Field(1.0, ge=0, description="reward weight of the loss improvement")
    delta_kb: float = Field(0.001, ge=0, description="reward cost per kilobyte exchanged")


Rule = Literal["mean", "trimmed_mean", "median", "norm_bounded"]


class AggregationConfig(Strict):
    """How the fedavg server combines the clients' weights (robust rules: plaintext only)."""

    rule: Rule = "mean"
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed_mean: share of clients cut at each end, per coordinate"
    )
    norm_bound: float | None = Field(
        None, gt=0, description="norm_bounded: largest L2 norm of one client's update (weights - global)"
    )
    client_clip_norm: float | None = Field(
        None, gt=0, description="each client clips its own update to this L2 norm before sending (HE too)"
    )

    @model_validator(mode="after")
    def _bound_given(self) -> AggregationConfig:
        if self.rule == "norm_bounded" and self.norm_bound is None:
            raise ValueError("aggregation.rule=norm_bounded needs aggregation.norm_bound (e.g. 1.0)")
        return self


class FederatedJob(Strict):
    """`secure-kd federate`: N organizations distil together without sharing data."""

    schema_version: int = SCHEMA_VERSION
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    out: str = "runs/federate"
    n_organizations: int = Field(4, ge=2, le=10_000)
    rounds: int = Field(3, ge=1)
    mode: Mode = "fedavg"
    protection: Protection = "plaintext"
    min_clients: int | None = Field(None, ge=1, description="default: every organization must answer")
    partition: PartitionConfig = PartitionConfig()
    student: ModelConfig = ModelConfig()
    students: list[ModelConfig] = Field(
        default_factory=list, description="heterogeneous students: organization i uses students[i % len]"
    )
    teacher: ModelConfig | None = Field(
        None,
        description="each organization's own teacher for local distillation; none: local language modelling",
    )
    tokenizer: str = Field(
        "tiny:320", description="'tiny:<vocab>' (trained on the public records) or a directory"
    )
    data: DataConfig = DataConfig()
    kd: KDConfig = KDConfig()
    train: TrainConfig = TrainConfig()
    transfer: TransferConfig = TransferConfig()
    ckks: CkksConfig = CkksConfig()
    secagg: SecAggConfig = SecAggConfig()
    pate: PateConfig = PateConfig()
    p2p: P2PConfig = P2PConfig()
    round_timeout_s: float = Field(
        600.0, gt=0, description="a client that has not answered by then is dropped"
    )
    join_timeout_s: float = Field(300.0, gt=0, description="how long the server waits for the organizations")
    max_message_mb: float = Field(64.0, gt=0, description="larger replies are dropped unread")
    simultaneous_clients: int | None = Field(
        None, ge=1, description="simulation: ClientApps run at once (default: the CPU count)"
    )
    simulate_faults: dict[int, FaultKind] = Field(
        default_factory=dict,
        description="tests only: organization index -> crash | crash_final | slow | nan | oversized "
        "| wrong_shape",
    )
    adversaries: dict[int, AdversaryConfig] = Field(
        default_factory=dict,
        description="attack studies: organization index -> malicious role (federation.roles)",
    )
    aggregation: AggregationConfig = AggregationConfig()
    client_dp: ClientDPConfig | None = Field(
        None, description="client-level DP for fedavg: clipped updates, Gaussian noise on their sum"
    )
    organization_models: dict[int, OrganizationModel] = Field(
        default_factory=dict,
        description="organization index -> its own tokenizer and student (federation.cross_tokenizer_config);"
        " different tokenizers federate in fed_distill only",
    )
    organizations: list[str] = Field(
        default_factory=list,
        description="names of the organizations in order (deployment: their SuperNodes' `org-name`); "
        "default org-0, org-1, ...",
    )

    @property
    def required_clients(self) -> int:
        return self.min_clients if self.min_clients is not None else self.n_organizations

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def student_for(self, index: int) -> ModelConfig:
        own = self.organization_models.get(index)
        if own is not None and own.student is not None:
            return own.student
        return self.students[index % len(self.students)] if self.students else self.student

    def org_name(self, index: int) -> str:
        return self.organizations[index] if self.organizations else f"org-{index}"

    @model_validator(mode="after")
    def _consistent(self) -> FederatedJob:
        problems = _problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _problems(job: FederatedJob) -> list[str]:
    found: list[str] = []
    if job.min_clients is not None and job.min_clients > job.n_organizations:
        found.append(f"min_clients={job.min_clients} exceeds n_organizations={job.n_organizations}")
    if job.mode == "fedavg" and job.students and any(s != job.students[0] for s in job.students):
        found.append(
            "fedavg averages weights, so every organization needs the same student; drop `students`"
            " or use mode fed_distill (it works across architectures)"
        )
    if job.protection == "secagg+" and job.mode != "fedavg":
        found.append("protection secagg+ sums masked vectors (Flower's SecAgg+): use it with mode fedavg")
    if job.protection == "secagg+" and job.required_clients < 2:
        found.append("secagg+ needs min_clients >= 2 (a single masked vector would be its own sum)")
    if job.mode in ("pate", "p2p") and job.protection != "plaintext":
        found.append(
            f"mode {job.mode} aggregates nothing under encryption: set protection: plaintext "
            "(p2p payloads are always sealed end to end between peers; pate's votes go to the "
            "trusted aggregator, who adds the GNMax noise)"
        )
    if job.mode in ("fed_distill", "p2p") and job.kd.kd_weight == 0:
        found.append(f"mode {job.mode} distils from shared soft labels: set kd.kd_weight > 0")
    if job.kd.teacher_targets != "live" or job.kd.mode != "off_policy":
        found.append("federated jobs use kd.teacher_targets: live and kd.mode: off_policy")
    if job.kd.fused:
        found.append(
            "kd.fused is not used by federated jobs (soft labels cover a public index set): set it false"
        )
    if job.transfer.filtering is not None and job.mode != "fed_distill":
        found.append("transfer.filtering weights soft labels in the ensemble: use it with mode fed_distill")
    filtering = job.transfer.filtering
    if filtering is not None and job.train.privacy is not None:
        found.append(
            "transfer.filtering with train.privacy: the filter weights come from KMeans on each "
            "organization's private records and are released every round, which the DP-SGD epsilon does "
            "not cover (the filter is not differentially private); drop transfer.filtering or train.privacy"
        )
    if filtering is not None and job.protection == "ckks" and filtering.floor_weight == 0:
        found.append(
            "transfer.filtering.floor_weight must be > 0 under ckks (the encrypted weights of a record no"
            " organization keeps would sum to 0)"
        )
    found.extend(_reference_problems(job))
    found.extend(cross_tokenizer_problems(job))
    if job.data.packing:
        found.append("data.packing mixes records of one organization into blocks; set data.packing: false")
    if job.organizations:
        from federation.crypto.identity import check_org

        names, distinct = len(job.organizations), len(set(job.organizations))
        if names != job.n_organizations or distinct != names:
            found.append(
                f"organizations lists {names} name(s) ({distinct} distinct): give "
                f"n_organizations={job.n_organizations} distinct names"
            )
        for name in job.organizations:
            try:
                check_org(name)
            except ValueError as exc:
                found.append(f"organizations: {exc}")
    bad = sorted(i for i in job.simulate_faults if not 0 <= i < job.n_organizations)
    if bad:
        found.append(f"simulate_faults names organizations {bad}, outside 0..{job.n_organizations - 1}")
    found.extend(_adversarial_problems(job))
    if job.client_dp is not None:
        found.extend(
            client_dp_problems(
                job.client_dp,
                mode=job.mode,
                protection=job.protection,
                aggregation_rule=job.aggregation.rule,
                client_clip_norm=job.aggregation.client_clip_norm,
                required_clients=job.required_clients,
                n_organizations=job.n_organizations,
                rounds=job.rounds,
                secagg_clipping_range=job.secagg.clipping_range,
            )
        )
    if job.teacher is not None and job.teacher.source == "teacher_layers":
        found.append("teacher.source cannot be 'teacher_layers'; that builds a student")
    found.extend(_teacher_layers_problems(job))
    if job.train.privacy is not None:
        from secure_kd.dp.trainer import check_private_objective

        try:
            check_private_objective(job.kd)
        except ValueError as exc:
            found.append(str(exc))
    return found


def _reference_problems(job: FederatedJob) -> list[str]:
    """`transfer.reference` is a public model that scores the transfer text with the job's tokenizer."""
    reference = job.transfer.reference
    if reference is None:
        return []
    found: list[str] = []
    if reference.source in ("teacher_layers", "served"):
        found.append(
            f"transfer.reference.source: {reference.source} cannot be a reference: give a public model "
            "every participant loads (smollm2, a local directory, or tiny)"
        )
    if reference.lora is not None:
        found.append("transfer.reference.lora: the reference is a fixed public model; drop lora")
    if reference.source != "tiny" and job.tokenizer.startswith("tiny:"):
        found.append(
            f"transfer.reference.source: {reference.source} scores text with its own tokenizer, but "
            f"tokenizer is {job.tokenizer!r}: set tokenizer: {reference.source} (or teacher, when the "
            "teacher is that model)"
        )
    return found


def _teacher_layers_problems(job: FederatedJob) -> list[str]:
    """`student.source: teacher_layers` copies layers of the job's `teacher`, with its vocabulary."""
    found: list[str] = []
    for name, student in [
        ("student", job.student),
        *((f"students.{i}", s) for i, s in enumerate(job.students)),
    ]:
        if student.source != "teacher_layers":
            continue
        if job.teacher is None:
            found.append(
                f"{name}.source: teacher_layers copies layers of the teacher, and this job has none: add a "
                "`teacher` (e.g. source: smollm2) or use student.source: tiny or a model directory"
            )
        elif job.teacher.source != "tiny" and job.tokenizer not in ("teacher", job.teacher.source):
            found.append(
                f"{name}.source: teacher_layers keeps the teacher's vocabulary, but tokenizer is "
                f"{job.tokenizer!r}: set tokenizer: teacher"
            )
    return found


def _adversarial_problems(job: FederatedJob) -> list[str]:
    found: list[str] = []
    bad = sorted(i for i in job.adversaries if not 0 <= i < job.n_organizations)
    if bad:
        found.append(f"adversaries names organizations {bad}, outside 0..{job.n_organizations - 1}")
    for index, adversary in job.adversaries.items():
        wanted = "fedavg" if adversary.kind in FEDAVG_KINDS else "fed_distill"
        if job.mode != wanted:
            found.append(f"adversaries.{index}.kind={adversary.kind} attacks mode {wanted}, not {job.mode}")
    aggregation = job.aggregation
    if aggregation.rule != "mean" and job.mode != "fedavg":
        found.append(
            f"aggregation.rule={aggregation.rule} combines fedavg weights: use mode fedavg or rule mean"
        )
    if aggregation.rule != "mean" and job.protection != "plaintext":
        found.append(
            f"aggregation.rule={aggregation.rule} needs each client's plaintext update, which protection "
            f"{job.protection} hides: set aggregation.rule: mean and bound clients with "
            "aggregation.client_clip_norm (clients clip before encrypting)"
        )
    if aggregation.client_clip_norm is not None and job.mode != "fedavg":
        found.append("aggregation.client_clip_norm clips fedavg updates: use mode fedavg")
    return found


def load_federated_job(path: str | Path | None, overrides: list[str] | None = None) -> FederatedJob:
    """Read a YAML job (or start from the defaults), apply `--set key=value` overrides, validate.

    Raises `secure_kd.config.ConfigError` naming every wrong field.
    """
    return load_config(path, overrides, FederatedJob)


def job_from_json(data: dict[str, Any]) -> FederatedJob:
    return FederatedJob.model_validate(data)
