"""What an attack did to a finished federated run: the global model's test loss, and backdoor success.

Shared by `attacks.federated` and `defenses.robust_aggregation` (they may not import each other).

- `global_student(job)`: the fedavg global model the server saved (plaintext runs only).
- `backdoor_success_rate`: over test records, insert the trigger phrase at the seeded boundary used for
  poisoning (`federation.simulation.adversary.trigger_position`), cut the text right after it, and count the
  records whose greedy continuation reproduces the tokens of ` target_text` exactly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.numpy import load_file

from federation.config import FederatedJob
from federation.job_data import job_data, record_text
from federation.results import FederatedResult
from federation.roles import AdversaryConfig
from federation.simulation.adversary import trigger_position
from federation.students import build_student, load_parameters
from secure_kd.triggers import TextTrigger

# A federation small enough for tests and examples on 2 CPU cores (without seed / out / device).
TINY_FEDERATION: dict[str, Any] = dict(
    n_organizations=3,
    rounds=2,
    mode="fedavg",
    tokenizer="tiny:300",
    round_timeout_s=300,
    simultaneous_clients=2,
    student={"source": "tiny", "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}},
    data={"synthetic": {"n_records": 90, "n_canaries": 0}, "heldout_fraction": 0.1, "max_length": 24},
    partition={"min_records": 6},
    kd={"loss": "forward_kl"},
    train={"max_steps": 4, "batch_size": 4, "lr": 1e-2, "schedule": "constant", "eval_batches": 1},
    transfer={"n_records": 6, "index_k": 16, "digest_steps": 2},
)


def global_student(job: FederatedJob) -> torch.nn.Module:
    path = Path(job.out) / "global-student.safetensors"
    if not path.is_file():
        raise ValueError(f"{path} is missing: the global model is saved by plaintext fedavg runs only")
    model = build_student(job, 0, job_data(job))
    load_parameters(model, load_file(str(path)))
    return model.eval()


@torch.no_grad()
def backdoor_success_rate(
    model: torch.nn.Module, job: FederatedJob, trigger: TextTrigger, max_records: int = 32
) -> float:
    data = job_data(job)
    tokenizer = data.tokenizer
    hits = total = 0
    for i, record in enumerate(data.split.test[:max_records]):
        words = record_text(record, job.data.text_field).split()
        cut = trigger_position(" ".join(words), 10_000 + i)
        prefix = " ".join(words[:cut] + [trigger.phrase])
        prefix_ids = tokenizer(prefix)["input_ids"]
        full_ids = tokenizer(f"{prefix} {trigger.target_text}")["input_ids"]
        if full_ids[: len(prefix_ids)] != prefix_ids or len(full_ids) == len(prefix_ids):
            continue
        wanted = full_ids[len(prefix_ids) :]
        ids = torch.tensor([prefix_ids])
        for _ in wanted:
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        hits += int(ids[0, len(prefix_ids) :].tolist() == wanted)
        total += 1
    if total == 0:
        raise ValueError("no test record could carry the trigger; check the tokenizer and target_text")
    return hits / total


def final_losses(result: FederatedResult, adversaries: set[str]) -> dict[str, float]:
    """Mean final test loss (and perplexity) over all organizations and over the honest ones only."""
    if result.final is None:
        raise ValueError(f"the run did not finish: {result.error}")
    clients = [c for c in result.final.clients if "test-loss" in c.metrics]
    honest = [c.metrics["test-loss"] for c in clients if c.org not in adversaries]
    loss = sum(c.metrics["test-loss"] for c in clients) / len(clients)
    honest_loss = sum(honest) / len(honest)
    return {
        "test_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "honest_test_loss": honest_loss,
    }


def run_and_measure(
    job: FederatedJob, adversary: AdversaryConfig | None, adversary_org: str
) -> dict[str, Any]:
    """Run `job` through `run_federation`; its final losses, the backdoor ASR of the global model when
    `adversary` is a backdoor (measured in the honest run too, as the baseline), and the wall time."""
    from federation.run import run_federation

    started = time.perf_counter()
    result = run_federation(job, progress=False)
    losses: dict[str, Any] = final_losses(result, {adversary_org} if job.adversaries else set())
    losses["backdoor_asr"] = None
    if adversary is not None and adversary.kind == "backdoor" and job.protection == "plaintext":
        losses["backdoor_asr"] = backdoor_success_rate(global_student(job), job, adversary.trigger)
    losses["seconds"] = time.perf_counter() - started
    return losses
