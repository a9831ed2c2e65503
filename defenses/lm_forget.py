"""Forgetting and backdoor unlearning on the user's own causal LM: `secure-kd defend forget` (or
`unlearn`) `--model DIR --clean FILE --forget FILE --out DIR`.

The technique of `defenses.forgetting` (canary mode) and `defenses.backdoor_unlearning` (self-
distillation with clean anchors), applied to a Hugging Face model directory and the user's records
instead of a planted toy world: the model is distilled into itself (forward KL at T=1) toward
`SafeTargets` (`defenses.lm_forget_targets`), in two phases as in SCRUB: the forget records alone
(`forget_epochs`), then forget and clean records together (`repair_epochs`), where the clean records
keep the original's own outputs. `forget` suppresses the forgotten tokens; `unlearn` with `trigger`
pulls each triggered record to its clean anchor (without `trigger` it suppresses, as `forget`).

Measured before and after, on the same tokens: the forget set's loss (mean NLL per forgotten token),
top-1 rate (share of forgotten tokens that are the model's argmax, teacher-forced) and greedy rate
(share of records whose greedy continuation from before the forgotten span reproduces it: the attack
success rate of a triggered record, the extraction of a secret), the exposure of
each record's `secret` among `n_candidates` random strings of its format (an estimate over a sampled
space, at most log2(n_candidates + 1) bits), and the perplexity of the held-out clean file (default:
the clean file). The defended model is saved (safetensors) with the tokenizer in `<out>/model`.
Approximate unlearning: nothing certifies removal; a retrained model is the reference the papers use.
"""

from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator
from torch import nn

from defenses.lm_forget_data import ForgetRecord, forget_record
from defenses.lm_forget_targets import SafeTargets, token_formats
from secure_kd.config import KDConfig, Strict, TrainConfig
from secure_kd.data import TokenizedExample, collate, load_records, tokenize_records
from secure_kd.evaluate import perplexity
from secure_kd.metrics import exposure
from secure_kd.model_files import load_pretrained, load_tokenizer
from secure_kd.models import resolve_device
from secure_kd.paths import atomic_write_json
from secure_kd.trainer import fit_in_scratch

NOTE = (
    "approximate unlearning by self-distillation: it lowers what the measurements see, and certifies "
    "nothing; compare with a model retrained without the forget set where you can"
)


class ModelForgetConfig(Strict):
    """`secure-kd defend forget|unlearn --model DIR --clean FILE --forget FILE --out DIR [--set k=v]`."""

    model: str = Field(..., description="the Hugging Face model directory (safetensors) to defend")
    clean: str = Field(..., description="records to keep (jsonl/json/csv/parquet/txt)")
    forget: str = Field(..., description="records to forget: text or prompt/completion, optional 'secret'")
    heldout: str | None = Field(None, description="clean records for the perplexity (default: `clean`)")
    out: str = Field(..., description="where <out>/model and <out>/results.json go")
    trigger: str | None = Field(
        None, description="unlearn: the backdoor trigger found in every forget record"
    )
    text_field: str = "text"
    max_length: int = Field(128, ge=8)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    forget_epochs: int = Field(5, ge=1)
    repair_epochs: int = Field(1, ge=0)
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    alternatives: Literal["same_format", "all"] = Field(
        "same_format",
        description="a forgotten token's logit becomes the median of the tokens of its format (digits for "
        "digits), or the mean of all others (alternatives_k: of the k most likely)",
    )
    alternatives_k: int | None = Field(
        None, ge=1, description="alternatives all: the mean of the k best others"
    )
    n_candidates: int = Field(200, ge=10, le=100_000, description="random strings per secret (exposure)")
    max_records: int = Field(100_000, ge=1, description="refuse files with more records than this")

    @field_validator("model")
    @classmethod
    def _model_dir(cls, value: str) -> str:
        path = Path(value)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"{value!r} is not a Hugging Face model directory (a folder with config.json)")
        return value

    @field_validator("clean", "forget", "heldout")
    @classmethod
    def _file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(
                f"{value!r} is not a file; give a jsonl, json, csv, parquet or txt file of records"
            )
        return value


class Measurement(BaseModel):
    forget_loss: float
    forget_top1: float
    forget_greedy: float = Field(
        ..., description="share of forget records whose greedy continuation reproduces the forgotten span"
    )
    forget_exposure: float | None
    clean_perplexity: float


class ModelForgetResult(BaseModel):
    kind: str
    method: str
    model: str
    defended_model: str
    n_forget: int
    n_clean: int
    before: Measurement
    after: Measurement
    max_exposure: float | None
    note: str = NOTE
    seconds: float


def _records(path: str, cap: int) -> list[dict[str, Any]]:
    records = [dict(r) for r in load_records(path)]
    if len(records) > cap:
        raise ValueError(
            f"{path}: {len(records)} records, over max_records {cap}; raise it or split the file"
        )
    return records


def _random_like(secret: str, rng: random.Random) -> str:
    pools = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    out = []
    for ch in secret:
        pool = next((p for p in pools if ch in p), None)
        out.append(rng.choice(pool) if pool else ch)
    return "".join(out)


@torch.no_grad()
def _span_nll(model: nn.Module, tokenizer: Any, before: str, span: str, device) -> float:
    """Total NLL of `span`'s tokens after `before` (pieces tokenized apart, as the forget records)."""
    head = list(tokenizer(before, add_special_tokens=False)["input_ids"]) if before else []
    tail = list(tokenizer(span, add_special_tokens=False)["input_ids"])
    if not head:
        head = [tokenizer.eos_token_id]
    ids = torch.tensor([head + tail], device=device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(-logp[torch.arange(len(targets)), targets][len(head) - 1 :].sum())


def secret_exposure(model, tokenizer, record: ForgetRecord, n: int, seed: int, device) -> float:
    before, secret, _ = record.secret
    rng = random.Random(f"{seed}:{record.example.record_index}")
    candidates, seen = [secret], {secret}
    while len(candidates) < n + 1 and len(seen) < 10 * (n + 1):
        c = _random_like(secret, rng)
        if c not in seen:
            seen.add(c)
            candidates.append(c)
    losses = [_span_nll(model, tokenizer, before, c, device) for c in candidates]
    return exposure(losses, 0)


@torch.no_grad()
def _greedy_reproduces(model, record: ForgetRecord, device) -> bool:
    """Greedy decoding from the tokens before the forgotten span gives the span's tokens exactly (for a
    triggered record: the attack succeeds; for a secret: it is extracted)."""
    first = record.flags.index(1.0)
    last = len(record.flags) - 1 - record.flags[::-1].index(1.0)
    ids = record.example.input_ids
    context = torch.tensor([ids[:first]], device=device)
    for position in range(first, last + 1):
        token = int(model(input_ids=context).logits[0, -1].argmax())
        if token != ids[position]:
            return False
        context = torch.cat([context, context.new_tensor([[token]])], dim=1)
    return True


@torch.no_grad()
def measure(
    model, tokenizer, forget: list[ForgetRecord], heldout: list[TokenizedExample], config, device
) -> Measurement:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    nll, top1, n = 0.0, 0, 0
    for record in forget:
        ids = torch.tensor([record.example.input_ids], device=device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        keep = torch.tensor(record.flags[1:], device=device) > 0
        nll += float(-logp[torch.arange(len(targets)), targets][keep].sum())
        top1 += int((logp.argmax(-1) == targets)[keep].sum())
        n += int(keep.sum())
    greedy = sum(_greedy_reproduces(model, record, device) for record in forget) / len(forget)
    secrets = [r for r in forget if r.secret is not None]
    exposures = [
        secret_exposure(model, tokenizer, r, config.n_candidates, config.seed, device) for r in secrets
    ]
    batches = [collate(heldout[i : i + 8], pad_id=pad) for i in range(0, len(heldout), 8)]
    return Measurement(
        forget_loss=nll / max(n, 1),
        forget_top1=top1 / max(n, 1),
        forget_greedy=greedy,
        forget_exposure=sum(exposures) / len(exposures) if exposures else None,
        clean_perplexity=float(perplexity(model, batches, device=device)["perplexity"]),
    )


def run_model_forget(config: ModelForgetConfig, kind: str, log=print) -> ModelForgetResult:
    """Load, measure, distil into itself toward the safe targets, measure, save; see the module."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.model)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {config.model!r} has no eos token; set one and save it again")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    original = load_pretrained(config.model).to(device).eval()
    trigger = config.trigger if kind == "unlearn" else None
    if kind == "forget" and config.trigger is not None:
        raise ValueError("trigger applies to `defend unlearn` (backdoor unlearning); remove it for forget")
    forget_rows = _records(config.forget, config.max_records)
    forget = [
        forget_record(
            r,
            i,
            tokenizer,
            text_field=config.text_field,
            max_length=config.max_length,
            trigger=trigger,
            source=config.forget,
        )
        for i, r in enumerate(forget_rows)
    ]
    tokenize = dict(max_length=config.max_length, text_field=config.text_field)
    clean = tokenize_records(_records(config.clean, config.max_records), tokenizer, **tokenize)
    held = clean
    if config.heldout is not None:
        held = tokenize_records(_records(config.heldout, config.max_records), tokenizer, **tokenize)
    if not clean or not held:
        raise ValueError(f"{config.clean}: no clean sequence left after tokenization")
    log(f"measuring the original on {len(forget)} forget and {len(held)} held-out clean records ...")
    before = measure(original, tokenizer, forget, held, config, device)

    groups = None
    if config.alternatives == "same_format":
        groups = token_formats(tokenizer, original.get_output_embeddings().weight.shape[0])
    student = copy.deepcopy(original)
    student.requires_grad_(True)
    kd = KDConfig(loss="forward_kl", top_k=None, temperature=1.0, kd_weight=1.0, ce_weight=0.0)
    phases = [([r.example for r in forget], list(forget), config.forget_epochs)]
    if config.repair_epochs > 0:
        phases.append(
            ([r.example for r in forget] + clean, list(forget) + [None] * len(clean), config.repair_epochs)
        )
    for phase, (examples, rows, epochs) in enumerate(phases):
        log(f"phase {phase + 1}: {epochs} epoch(s) on {len(examples)} sequences ...")
        train = TrainConfig(
            epochs=epochs, batch_size=config.batch_size, lr=config.lr, schedule="constant", max_grad_norm=1.0
        )
        targets = SafeTargets(original, rows, k=config.alternatives_k, groups=groups)
        fit_in_scratch(
            student, examples, kd, train, pad_id=pad, seed=config.seed + phase, device=device, targets=targets
        )
    after = measure(student, tokenizer, forget, held, config, device)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    partial = out / ".model.partial"
    student.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    partial.rename(model_dir)
    secrets = [r for r in forget if r.secret is not None]
    result = ModelForgetResult(
        kind=kind,
        method="clean_anchor" if trigger is not None else "suppress",
        model=config.model,
        defended_model=str(model_dir),
        n_forget=len(forget),
        n_clean=len(clean),
        before=before,
        after=after,
        max_exposure=math.log2(config.n_candidates + 1) if secrets else None,
        seconds=time.perf_counter() - started,
    )
    atomic_write_json(out / "results.json", result.model_dump(mode="json"))
    return result
