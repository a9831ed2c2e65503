"""Canaries for a one-run DP audit (Steinke, Nasr & Jagielski 2023): made, inserted, recorded, scored.

A training job with `audit.canaries: {n, seed}` gets `n` canary records, "Audit canary {index}: the
passphrase is {secret}." with a random 12-character secret (lowercase letters and digits, drawn from
`seed`; a secret found in the job's own data is drawn again, so no canary is a real record). Each is
inserted into the training records independently with probability 1/2 (also from `seed`), after the
train/held-out split, so a canary is never held out. The canaries are ordinary training records: the
cache, the sampler and DP-SGD see them like any other, and the DP sample rate counts them.

Which canaries went in is the auditor's secret: `<out>/audit-canaries.json` (the sidecar, mode 0600)
lists all `n` with their `inserted` flag. results.json only says how many.

The DP ledger stays keyed on the private records alone (`dataset_key` of the source before the split),
canaries excluded: a key over the canaries would give every canary seed a ledger of its own, that is a
fresh budget on the same private records. So runs with and without canaries on one dataset draw on one
budget; the canaries themselves are protected at the run's epsilon like any record of it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_kd.paths import atomic_write_text

TEMPLATE = "Audit canary {index}: the passphrase is {secret}."
SECRET_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
SECRET_LENGTH = 12
TOPIC = "audit_canary"
SIDECAR_NAME = "audit-canaries.json"
_KIND = "secure-kd/one-run-audit-canaries"
_VERSION = 1


@dataclass(frozen=True)
class AuditCanary:
    index: int
    prefix: str
    text: str
    inserted: bool


def make_canaries(n: int, seed: int, avoid: Iterable[str] = ()) -> list[AuditCanary]:
    """`n` canaries from `seed`, each marked inserted with probability 1/2 (independently); a secret
    that occurs in any text of `avoid` (the job's records) is drawn again."""
    if n < 2:
        raise ValueError(f"audit.canaries.n must be >= 2, got {n}")
    corpus = "\n".join(avoid)
    rng = np.random.default_rng([seed, 0x0A0D17])
    inserted = rng.random(n) < 0.5
    canaries, seen = [], set()
    for index in range(n):
        while True:
            secret = "".join(rng.choice(list(SECRET_ALPHABET), SECRET_LENGTH))
            if secret not in seen and secret not in corpus:
                break
        seen.add(secret)
        text = TEMPLATE.format(index=index, secret=secret)
        prefix = text[: text.index(secret)]
        canaries.append(AuditCanary(index, prefix, text, bool(inserted[index])))
    return canaries


def canary_record(canary: AuditCanary, schema: str, text_field: str = "text") -> dict[str, Any]:
    """The canary as a record of the job's schema (text, prompt_completion or chat): the prefix is the
    prompt and the secret with the rest the completion, so it is trained whatever `mask_prompt` says."""
    rest = canary.text[len(canary.prefix) :]
    base = {"topic": TOPIC}  # no record_id: the job's own ids keep one type
    if schema == "chat":
        return {**base, "messages": [{"role": "user", "content": canary.prefix.strip()},
                                     {"role": "assistant", "content": rest}]}  # fmt: skip
    if schema == "prompt_completion":
        return {**base, "prompt": canary.prefix, "completion": rest}
    return {**base, text_field: canary.text}


def insert_canaries(
    records: list[dict], canaries: Sequence[AuditCanary], *, text_field: str, seed: int
) -> list[dict]:
    """`records` with the inserted canaries at seeded positions, in the records' own schema."""
    from secure_kd.data.tokenization import detect_schema

    schema = detect_schema(list(records[0]), text_field=text_field) if records else "text"
    chosen = [canary_record(c, schema, text_field) for c in canaries if c.inserted]
    out = list(records)
    rng = np.random.default_rng([seed, 0x1A5E27])
    for record in chosen:
        out.insert(int(rng.integers(0, len(out) + 1)), record)
    return out


def write_sidecar(out: str | Path, canaries: Sequence[AuditCanary], *, n: int, seed: int) -> Path:
    """`<out>/audit-canaries.json` (mode 0600): every canary, whether it was inserted, the template."""
    path = Path(out) / SIDECAR_NAME
    body = {
        "kind": _KIND,
        "version": _VERSION,
        "n": n,
        "seed": seed,
        "template": TEMPLATE,
        "n_inserted": sum(c.inserted for c in canaries),
        "canaries": [asdict(c) for c in canaries],
    }
    atomic_write_text(path, json.dumps(body, indent=2) + "\n", mode=0o600)
    return path


def read_sidecar(run_dir: str | Path) -> list[AuditCanary]:
    """The canaries a run recorded; a one-paragraph error when the run has none or the file is not one."""
    path = Path(run_dir) / SIDECAR_NAME
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: the run in {run_dir} was not trained with canaries. Train it with "
            "`audit: {canaries: {n: 1000, seed: 0}}` in its config (or --set audit.canaries.n=1000), then "
            "audit that run directory"
        )
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        if body.get("kind") != _KIND or body.get("version") != _VERSION:
            raise ValueError("kind/version")
        canaries = [
            AuditCanary(int(c["index"]), c["prefix"], c["text"], bool(c["inserted"]))
            for c in body["canaries"]
        ]
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{path} is not a version-{_VERSION} canary sidecar of secure-kd (written by a training run "
            "with audit.canaries); give the run directory that wrote it"
        ) from None
    if len(canaries) != body.get("n"):
        raise ValueError(f"{path} lists {len(canaries)} canaries but says n={body.get('n')}; it was changed")
    return canaries


@torch.no_grad()
def canary_losses(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32
) -> list[float]:
    """Mean next-token NLL of each text under `model` (plain text, with the tokenizer's special tokens)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for start in range(0, len(texts), batch_size):
            encoded = [tokenizer(t)["input_ids"] for t in texts[start : start + batch_size]]
            width = max(len(ids) for ids in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, seq in enumerate(encoded):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target, keep = ids[:, 1:], mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            per = (nll * keep).sum(1) / keep.sum(1).clamp(min=1)
            losses.extend(float(x) for x in per.cpu())
    finally:
        model.train(was_training)
    if any(not math.isfinite(x) for x in losses):
        raise ValueError("a canary's loss is not finite under this model")
    return losses


def claimed_privacy(run_dir: str | Path) -> dict[str, Any] | None:
    """What the run's privacy.json claims, or None for a non-private run. `epsilon` is this run's own
    (`run_epsilon`): the canaries were in this run only, so its guarantee is the one they test;
    `dataset_epsilon` is what the private records' ledger has spent over every run."""
    path = Path(run_dir) / "privacy.json"
    if not path.is_file():
        return None
    body = json.loads(path.read_text(encoding="utf-8"))
    return {
        "epsilon": body.get("run_epsilon", body.get("epsilon")),
        "dataset_epsilon": body.get("epsilon"),
        **{key: body.get(key) for key in ("delta", "accountant", "noise_multiplier", "steps")},
    }


def audit_canary_run(
    run_dir: str | Path,
    *,
    model: str | Path | None = None,
    reference: str | Path | None = None,
    confidence: float = 0.95,
    device: str = "cpu",
) -> dict[str, Any]:
    """The one-run audit of a training run with canaries: score every canary with the trained model (by
    default `<run_dir>/student`), lower loss = guessed inserted; with `reference` (e.g. the teacher, which
    never saw the canaries) the score is the loss ratio, reference loss minus model loss. The bound uses
    the run's claimed delta (0 for a non-private run) and sits next to its claimed epsilon (the run's own,
    `claimed_privacy`)."""
    from secure_kd.model_files import load_pretrained, load_tokenizer
    from secure_kd.one_run_audit import audit_from_scores

    canaries = read_sidecar(run_dir)
    target_dir = Path(model) if model is not None else Path(run_dir) / "student"
    texts = [c.text for c in canaries]
    tokenizer = load_tokenizer(target_dir)
    target = load_pretrained(target_dir).to(device)
    losses = canary_losses(target, tokenizer, texts)
    scores = [-x for x in losses]
    if reference is not None:
        ref_losses = canary_losses(load_pretrained(reference).to(device), load_tokenizer(reference), texts)
        scores = [r - x for r, x in zip(ref_losses, losses, strict=True)]
    claimed = claimed_privacy(run_dir)
    delta = float(claimed["delta"]) if claimed and claimed.get("delta") is not None else 0.0
    result = audit_from_scores(scores, [c.inserted for c in canaries], delta=delta, confidence=confidence)
    return {
        "run": str(run_dir),
        "model": str(target_dir),
        "score": "reference loss - model loss" if reference is not None else "- model loss",
        "reference": str(reference) if reference is not None else None,
        "claimed_epsilon": claimed["epsilon"] if claimed else None,
        "claimed_delta": claimed["delta"] if claimed else None,
        "claimed_dataset_epsilon": claimed["dataset_epsilon"] if claimed else None,
        **result,
    }
