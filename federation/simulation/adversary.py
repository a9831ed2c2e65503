"""A malicious organization as a config-driven role: `FederatedJob.adversaries: {index: AdversaryConfig}`.

Unlike `simulate_faults` (payloads the server must reject), an adversary sends well-formed payloads that
pass every check, so a real run carries them into the aggregate:

- `scale` (fedavg): sends global + boost * (w - global), its honest update amplified.
- `sign_flip` (fedavg): sends global - boost * (w - global), its update reversed (Byzantine gradient
  ascent; e.g. Fang et al., USENIX Security 2020 use sign flips as a baseline).
- `backdoor` (fedavg): model replacement (Bagdasaryan et al., AISTATS 2020, "How To Backdoor Federated
  Learning"): trains locally on its records with the trigger phrase followed by `target_text` inserted
  (`secure_kd.triggers.TextTrigger`, `poison_fraction` of them), then scales the update by `boost`
  (the paper uses boost = n_clients / server_lr to replace the global model; ours is a config value).
  Like the paper's attacker it may train longer than honest clients (`local_steps`).
- `poison_soft_labels` (fed_distill): its soft labels on the transfer set become
  (1 - strength) * honest + strength * one_hot(target column), pushing the ensemble toward one token of
  the public index set; they stay valid distributions, so no validation rejects them.

Under ckks the client-side transformations are the same (the adversary controls its plaintext before
encryption), so these also show what HE does not protect against.

`adversary_mod` is the role as a Flower mod, which only the simulation's ClientApp installs
(`federation.simulation.mods`). Around an adversary's `train` handler it installs the backdoored records
and the attacker's own number of local steps, and puts `AdversaryHooks` in place of the honest ones at
the two points the honest client offers (`federation.client.hooks`): the weights it sends and its soft
labels, both before encryption or masking.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from federation.client import hooks
from federation.client.guard import current_workspace
from federation.client.hooks import ClientHooks
from federation.roles import FEDAVG_KINDS, AdversaryConfig
from federation.simulation.faults import handler_name
from secure_kd.triggers import TextTrigger


def malicious_weights(
    adversary: AdversaryConfig, trained: Mapping[str, np.ndarray], global_model: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The fedavg payload of an adversary that trained `trained` starting from `global_model`."""
    if adversary.kind not in FEDAVG_KINDS:
        return dict(trained)
    factor = -adversary.boost if adversary.kind == "sign_flip" else adversary.boost
    return {
        name: (
            global_model[name].astype(np.float64) + factor * (w.astype(np.float64) - global_model[name])
        ).astype(w.dtype)
        for name, w in trained.items()
    }


def poisoned_soft_labels(adversary: AdversaryConfig, labels: np.ndarray) -> np.ndarray:
    """(1 - strength) * labels + strength * one_hot(target_column), row by row."""
    if not 0 <= adversary.target_column < labels.shape[1]:
        raise ValueError(
            f"target_column={adversary.target_column} is outside the soft-label width {labels.shape[1]}"
        )
    target = np.zeros_like(labels, dtype=np.float64)
    target[:, adversary.target_column] = 1.0
    return (1.0 - adversary.strength) * labels.astype(np.float64) + adversary.strength * target


TRIGGER_WINDOW = 3  # words: the trigger goes near the start so max_length truncation keeps it


def trigger_position(text: str, seed: int) -> int:
    """The seeded word boundary, among the first TRIGGER_WINDOW, where the trigger is inserted."""
    import random

    return random.Random(seed).randint(0, min(len(text.split()), TRIGGER_WINDOW))


def backdoored_text(trigger: TextTrigger, text: str, seed: int) -> str:
    """`text` with `phrase target_text` inserted at `trigger_position` (the trigger's own position
    setting is not used: secure-kd keeps the pair within the first words so truncation cannot drop it)."""
    words = text.split()
    index = trigger_position(text, seed)
    return " ".join(words[:index] + [trigger.phrase, str(trigger.target_text)] + words[index:])


def poisoned_records(
    adversary: AdversaryConfig, records: list[dict[str, Any]], text_field: str, seed: int
) -> list[dict[str, Any]]:
    """The records with the first `poison_fraction` of a seeded permutation carrying the backdoor."""
    rng = np.random.default_rng(seed)
    chosen = set(
        rng.permutation(len(records))[: max(1, round(adversary.poison_fraction * len(records)))].tolist()
    )
    out = []
    for i, record in enumerate(records):
        record = dict(record)
        if i in chosen:
            field = text_field if text_field in record else "text"
            record[field] = backdoored_text(adversary.trigger, str(record.get(field, "")), seed + i)
        out.append(record)
    return out


def install_backdoor_data(ws, adversary: AdversaryConfig) -> None:
    """Replace the organization's training examples with the backdoored ones (held-out stays clean)."""
    from secure_kd.data.tokenization import tokenize_records

    job = ws.job
    records = poisoned_records(
        adversary, [dict(r) for r in ws.own_data.train], job.data.text_field, job.seed + ws.index
    )
    train = tokenize_records(
        records,
        ws.public.tokenizer,
        max_length=job.data.max_length,
        text_field=job.data.text_field,
        mask_prompt=job.data.mask_prompt,
    )
    _, heldout, texts = ws.private
    ws.__dict__["private"] = (train, heldout, texts)


class AdversaryHooks(ClientHooks):
    """What an adversary sends: its crafted weights (it skips `client_clip_norm`: clipping is what
    honest clients do), its poisoned soft labels."""

    def __init__(self, adversary: AdversaryConfig) -> None:
        self.adversary = adversary

    def fedavg_weights(self, ws, trained, start) -> dict[str, np.ndarray]:
        return malicious_weights(self.adversary, trained, start)

    def soft_labels(self, ws, labels: np.ndarray) -> np.ndarray:
        if self.adversary.kind == "poison_soft_labels":
            return poisoned_soft_labels(self.adversary, labels)
        return labels


def adversary_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The organization's `adversaries` entry, around its `train` handler (nothing for the others)."""
    ws = current_workspace()
    adversary = ws.job.adversaries.get(ws.index)
    if adversary is None or handler_name(message) != "train.default":
        return call_next(message, context)
    if adversary.kind == "backdoor":
        install_backdoor_data(ws, adversary)
    job = ws.job
    ws.public  # noqa: B018 - the public data derive from the job as given, not the attacker's steps
    if adversary.local_steps is not None:  # a backdoor attacker may train longer (local_steps)
        ws.job = job.model_copy(
            update={"train": job.train.model_copy(update={"max_steps": adversary.local_steps})}
        )
    token = hooks.install(AdversaryHooks(adversary))
    try:
        return call_next(message, context)
    finally:
        hooks.remove(token)
        ws.job = job


adversary_mod.job_field = "adversaries"  # the job field this mod runs (federation.client.app)
