"""Attacks on federated distillation (`secure-kd attack federated`).

1. A malicious organization (`federation.simulation.adversary`): in fedavg it sends scaled (`scale`),
   sign-flipped (`sign_flip`) or backdoored and boosted updates (`backdoor`, model replacement,
   Bagdasaryan et al., AISTATS 2020); in fed_distill it poisons its soft labels toward one column of the
   public index set (`poison_soft_labels`). The plugin runs the same job twice through
   `federation.run.run_federation` (the real Flower apps), all honest and with the adversary, same seed,
   and reports the final test loss / perplexity (all organizations and honest ones only) and, for a
   backdoor, the attack success rate of the global model (`federation.simulation.adversary_eval`).

2. Update inversion by an honest-but-curious fedavg server: the "bag of words" leak of federated
   language models (e.g. Melis et al., S&P 2019, "Exploiting Unintended Feature Leakage in
   Collaborative Learning"; Gupta et al., NeurIPS 2022, "Recovering Private Text in Federated Learning
   of Language Models"). The gradient of the input embedding matrix is zero on every row whose token
   was not an input of the batch, and Adam with zero state (and no weight decay) moves exactly the rows
   with a non-zero gradient, so the rows that changed between the global model and one client's
   single-step update are the set of tokens it trained on. What is reconstructed: the token set only
   (not counts, order, or which record a token came from; the last token of a sequence has no
   gradient, so it is found only if it also occurs earlier). What is not: the text itself. It needs
   untied input embeddings (a tied output layer gives every row a gradient) and a plaintext update;
   under `ckks` or `secagg+` the server holds only ciphertexts or masked sums, so
   `server_visible_update` returns None and there is nothing to invert.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, model_validator

from attacks import ATTACKS
from federation.config import FederatedJob
from federation.messages import ARRAYS
from federation.roles import AdversaryConfig
from federation.simulation.adversary_eval import TINY_FEDERATION, run_and_measure
from secure_kd.plugins import Device, Metric, Plugin, PluginConfig, write_result
from secure_kd.readings import Reading, proportion

EMBEDDING_SUFFIX = "embed_tokens.weight"


# -- update inversion ----------------------------------------------------------------------------------
def server_visible_update(content: Any) -> dict[str, np.ndarray] | None:
    """The plaintext arrays a fedavg server reads from one client's reply; None under ckks / secagg+."""
    if ARRAYS not in content:
        return None
    return {name: array.numpy() for name, array in content[ARRAYS].items()}


def embedding_name(arrays: dict[str, np.ndarray]) -> str:
    names = [n for n in arrays if n.endswith(EMBEDDING_SUFFIX)]
    if len(names) != 1:
        raise ValueError(f"expected one input embedding array (*{EMBEDDING_SUFFIX}), found {names}")
    return names[0]


def recover_token_set(
    global_model: dict[str, np.ndarray], update: dict[str, np.ndarray], tolerance: float = 0.0
) -> set[int]:
    """Token ids whose input-embedding row differs between the global model and the client's weights."""
    name = embedding_name(update)
    delta = np.abs(update[name].astype(np.float64) - global_model[name].astype(np.float64))
    return set(np.nonzero(delta.max(axis=1) > tolerance)[0].tolist())


def influential_tokens(sequences: list[list[int]]) -> set[int]:
    """Tokens that reach the loss as inputs: every position but the last of each sequence."""
    return {t for seq in sequences for t in seq[:-1]}


def precision_recall(recovered: set[int], truth: set[int]) -> tuple[float, float]:
    hits = len(recovered & truth)
    return (hits / len(recovered) if recovered else 1.0), (hits / len(truth) if truth else 1.0)


class InversionReport(BaseModel):
    protection: str
    update_visible: bool
    recovered_tokens: int = 0
    true_tokens: int = 0
    precision: float | None = None
    recall: float | None = None
    note: str


def invert_single_step(job: FederatedJob, root: Path) -> InversionReport:
    """Organization 0 takes one local step over all its records from the initial global model; the server
    inverts the update it would receive (plaintext), or finds nothing to invert (ckks / secagg+)."""
    if job.protection != "plaintext":
        return InversionReport(
            protection=job.protection,
            update_visible=False,
            note="the server receives only a CKKS ciphertext / SecAgg+ masked vector: no update to invert",
        )
    from federation.client.training import train_locally
    from federation.client.workspace import OrgWorkspace
    from federation.students import flat_parameters

    probe = job.model_copy(deep=True)
    ws = OrgWorkspace(probe, 0, root)
    n_records = len(ws.train_examples)
    ws.job = probe.model_copy(
        update={
            "train": probe.train.model_copy(update={"max_steps": 1, "batch_size": n_records, "grad_accum": 1})
        }
    )
    model = ws.student()
    names, tensors = flat_parameters(model)
    start = {n: t.float().cpu().numpy().copy() for n, t in zip(names, tensors, strict=True)}
    train_locally(ws, model, 1)
    names, tensors = flat_parameters(model)
    update = {n: t.float().cpu().numpy().copy() for n, t in zip(names, tensors, strict=True)}
    recovered = recover_token_set(start, update)
    truth = influential_tokens([e.input_ids for e in ws.train_examples])
    precision, recall = precision_recall(recovered, truth)
    return InversionReport(
        protection=job.protection,
        update_visible=True,
        recovered_tokens=len(recovered),
        true_tokens=len(truth),
        precision=precision,
        recall=recall,
        note=f"one local step over all {n_records} records of org-0; token set only, no order or counts",
    )


# -- the plugin ----------------------------------------------------------------------------------------
class FederatedAttackConfig(PluginConfig):
    out: str = "runs/attacks/federated"
    device: Device = "cpu"
    federation: dict[str, Any] = Field(
        default_factory=lambda: dict(TINY_FEDERATION),
        description="a FederatedJob (without seed/out/device/adversaries); see docs/federation.md",
    )
    adversary_org: int = Field(-1, description="index of the malicious organization; -1: the last one")
    adversary: AdversaryConfig = AdversaryConfig(kind="scale")
    inversion: bool = Field(True, description="also invert one client's single-step update (fedavg)")

    def job(self, name: str, adversarial: bool) -> FederatedJob:
        fields = {
            **self.federation,
            "seed": self.seed,
            "device": self.device,
            "out": str(Path(self.out) / name),
        }
        if adversarial:
            fields["adversaries"] = {self.adversary_index: self.adversary.model_dump()}
        return FederatedJob.model_validate(fields)

    @property
    def adversary_index(self) -> int:
        n = int(self.federation.get("n_organizations", 4))
        return self.adversary_org % n

    @model_validator(mode="after")
    def _valid_jobs(self) -> FederatedAttackConfig:
        banned = {"seed", "out", "device", "adversaries"} & set(self.federation)
        if banned:
            raise ValueError(f"federation: drop {sorted(banned)}; they are set by the attack's own fields")
        try:
            self.job("check", True)
        except ValueError as exc:
            raise ValueError(f"federation / adversary: {exc}") from exc
        return self


class RunOutcome(BaseModel):
    test_loss: float
    perplexity: float
    honest_test_loss: float
    backdoor_asr: float | None = None
    seconds: float


class FederatedAttackResult(BaseModel):
    kind: str
    mode: str
    protection: str
    adversary_org: str
    honest: RunOutcome
    attacked: RunOutcome
    loss_increase: float
    inversion: InversionReport | None = None
    seconds: float


def run(config: FederatedAttackConfig) -> FederatedAttackResult:
    started = time.perf_counter()
    honest_job, attacked_job = config.job("honest", False), config.job("attacked", True)
    org = honest_job.org_name(config.adversary_index)
    honest = RunOutcome(**run_and_measure(honest_job, config.adversary, org))
    attacked = RunOutcome(**run_and_measure(attacked_job, config.adversary, org))
    inversion = None
    if config.inversion and honest_job.mode == "fedavg":
        inversion = invert_single_step(honest_job, Path(config.out) / "inversion")
    result = FederatedAttackResult(
        kind=config.adversary.kind,
        mode=honest_job.mode,
        protection=honest_job.protection,
        adversary_org=org,
        honest=honest,
        attacked=attacked,
        loss_increase=attacked.test_loss - honest.test_loss,
        inversion=inversion,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result


def readings(result: dict[str, Any], samples: int, confidence: float) -> dict[str, Reading]:
    """The rise of the global test loss caused by the malicious organization (one honest and one
    attacked run: no interval), the backdoor ASR when there is one, and the share of a client's tokens
    the server reads from one update (0 when the update is hidden)."""
    one_run = "one honest and one attacked run"
    out = {"poisoning_loss_increase": Reading(value=float(result["loss_increase"]), note=one_run)}
    asr = (result.get("attacked") or {}).get("backdoor_asr")
    if asr is not None:
        out["backdoor_asr"] = Reading(value=float(asr), note="federated backdoor, global model")
    inversion = result.get("inversion") or {}
    if inversion.get("update_visible") and inversion.get("recall") is not None:
        out["update_token_recall"] = proportion(
            float(inversion["recall"]), int(inversion["true_tokens"]), confidence
        )
    elif inversion:
        out["update_token_recall"] = Reading(value=0.0, note=inversion.get("note"))
    return out


PLUGIN = ATTACKS.register(
    "federated",
    Plugin(
        name="federated",
        Config=FederatedAttackConfig,
        Result=FederatedAttackResult,
        run=run,
        summary="malicious organization (scale, sign flip, backdoor, poisoned soft labels); update inversion",
        own_target="a simulated federation it runs itself",
        metrics=(
            Metric(
                "poisoning_loss_increase", risk="poisoning", medium=0.1, high=1.0, unit="nats",
                why="rise of the global model's test loss per token when one organization is malicious, "
                "against the same federation all honest",
            ),
            Metric(
                "backdoor_asr", risk="backdoor", medium=0.2, high=0.5,
                why="attack success rate of the trigger planted by the malicious organization, on the "
                "global model",
            ),
            Metric(
                "update_token_recall", risk="update_leakage", medium=0.1, high=0.5,
                why="share of the distinct tokens of one client's records that the server reads from one "
                "plaintext update (0 under ckks / secagg+, where it sees no update)",
            ),
        ),
        measure=readings,
    ),
)  # fmt: skip
