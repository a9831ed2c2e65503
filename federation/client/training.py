"""What a ClientApp does with its student: local training (DP-SGD when the job says so), distillation
from shared soft labels, evaluation. All of it goes through the engine's `Distiller` / `DPDistiller`.

Local training on private records: language modelling (`ce`) when the organization has no teacher,
otherwise distillation from its own teacher with the job's `kd` block. With `train.privacy`, it is
DP-SGD with the organization's ledger; the noise multiplier is fixed once for all rounds (the one
given, or one calibrated so that `rounds` rounds of local steps end at `target_epsilon`), so later
rounds are not starved by a budget calibrated for a single round.

Distillation from soft labels (the ensemble of fed_distill, a peer's in p2p) trains on public
transfer records only, so it needs no DP. On the byte-aligned layout (across tokenizers, or
`transfer.layout: bytes`) the distillation is `federation.client.cross_tokenizer`'s own loop on its rows.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass

from torch import nn

from federation.client.cross_tokenizer import distill_from_bytes, heldout_bits_per_byte, is_byte_layout
from federation.client.workspace import OrgWorkspace
from federation.soft_labels import EnsembleTargets
from federation.students import language_modelling, mean_loss
from secure_kd.config import TrainConfig
from secure_kd.dp.accounting import noise_multiplier_for_budget, resolve_delta
from secure_kd.dp.ledger import Ledger
from secure_kd.teacher_targets import LiveTeacher
from secure_kd.trainer import Distiller

logger = logging.getLogger("secure_kd.federation")


@dataclass(frozen=True)
class LocalFit:
    loss: float
    steps: int
    seconds: float
    epsilon: float | None = None
    delta: float | None = None


def _fit(ws: OrgWorkspace, distiller: Distiller, tag: str) -> tuple[float, int, float]:
    started = time.perf_counter()
    fit = distiller.fit()
    shutil.rmtree(distiller.out, ignore_errors=True)  # the state that matters is the saved student
    loss = fit.losses[-1] if fit.losses else float("nan")
    logger.debug("%s: %s, %d steps, loss %.4f", ws.name, tag, fit.steps, loss)
    return loss, fit.steps, time.perf_counter() - started


def _work_dir(ws: OrgWorkspace, tag: str, round_index: int):
    out = ws.root / "work" / f"{tag}-round-{round_index}"
    shutil.rmtree(out, ignore_errors=True)
    return out


def _private_train_config(ws: OrgWorkspace) -> TrainConfig:
    """train.privacy with this organization's ledger and a noise multiplier fixed for the whole job."""
    train = ws.job.train
    privacy = train.privacy
    assert privacy is not None
    noise = privacy.noise_multiplier
    if noise is None:
        noise = ws.state().get("noise_multiplier")
    if noise is None:
        n = len(ws.train_examples)
        sample_rate = min(1.0, train.batch_size * train.grad_accum / n)
        steps = _steps_per_round(ws) * ws.job.rounds
        ledger = Ledger.open(ws.ledger_key, ws.ledger_dir or privacy.ledger_dir)
        noise = noise_multiplier_for_budget(
            target_epsilon=privacy.target_epsilon,
            delta=resolve_delta(privacy.delta, n),
            sample_rate=sample_rate,
            steps=steps,
            accountant=privacy.accountant,
            prior=ledger.history(),
        )
        ws.update_state(noise_multiplier=noise)
    update = {
        "noise_multiplier": noise,
        "ledger_key": ws.ledger_key,
        "ledger_dir": ws.ledger_dir or privacy.ledger_dir,
        "max_noise_multiplier": max(privacy.max_noise_multiplier, noise),
    }
    return train.model_copy(update={"privacy": privacy.model_copy(update=update)})


def _steps_per_round(ws: OrgWorkspace) -> int:
    train = ws.job.train
    if train.max_steps is not None:
        return train.max_steps
    batches = math.ceil(len(ws.train_examples) / train.batch_size)
    return max(1, math.ceil(train.epochs * batches / train.grad_accum))


def train_locally(ws: OrgWorkspace, model: nn.Module, round_index: int) -> LocalFit:
    """One round of local training on the organization's private records."""
    job = ws.job
    teacher = ws.teacher
    kd = job.kd if teacher is not None else language_modelling(job.kd)
    targets = LiveTeacher(teacher, job.kd.top_k) if teacher is not None and kd.kd_weight > 0 else None
    common = dict(
        student=model,
        examples=ws.train_examples,
        kd=kd,
        teacher=teacher,
        targets=targets,
        out=_work_dir(ws, "local", round_index),
        pad_id=ws.public.pad_id,
        eos_id=ws.public.tokenizer.eos_token_id,
        seed=job.seed * 1_000_003 + ws.index * 1009 + round_index,
        device=ws.device,
        progress=False,
    )
    if job.train.privacy is None:
        loss, steps, seconds = _fit(ws, Distiller(train=job.train, **common), "local training")
        return LocalFit(loss, steps, seconds)
    from secure_kd.dp.trainer import DPDistiller

    distiller = DPDistiller(
        dataset_key=ws.data_fingerprint,  # the records before the split: what ledger_key must name
        train=_private_train_config(ws),
        log=lambda line: logger.info("%s: %s", ws.name, line),
        **common,
    )
    loss, steps, seconds = _fit(ws, distiller, "DP-SGD")
    report = distiller.report
    return LocalFit(
        loss, steps, seconds, report.epsilon if report else None, report.delta if report else None
    )


def distill_from(ws: OrgWorkspace, model: nn.Module, soft: object, round_index: int, *, steps: int) -> float:
    """Distil the student towards `soft` ([positions, k + 1] on the transfer set); returns the last loss."""
    if is_byte_layout(ws):  # across tokenizers (federation.client.cross_tokenizer)
        return distill_from_bytes(ws, model, soft, round_index, steps=steps)
    targets = EnsembleTargets(soft, ws.public.layout, ws.device)
    train = ws.job.train.model_copy(update={"max_steps": steps, "privacy": None})
    distiller = Distiller(
        student=model,
        examples=ws.public.transfer,
        kd=ws.job.kd,
        train=train,
        targets=targets,
        out=_work_dir(ws, "digest", round_index),
        pad_id=ws.public.pad_id,
        eos_id=ws.public.tokenizer.eos_token_id,
        seed=ws.job.seed + round_index,
        device=ws.device,
        progress=False,
    )
    return _fit(ws, distiller, "distillation from soft labels")[0]


def evaluate(ws: OrgWorkspace, model: nn.Module) -> dict[str, float]:
    """Held-out loss on the organization's own records and test loss on the public test set."""
    common = dict(
        pad_id=ws.public.pad_id,
        limit=ws.job.train.eval_batches,
        batch_size=ws.job.train.batch_size,
        device=ws.device,
    )
    out = {
        "heldout-loss": mean_loss(model, ws.heldout_examples, **common),
        "test-loss": mean_loss(model, ws.public.test, **common),
    }
    if is_byte_layout(ws):  # per-token losses of two tokenizers are not comparable, bits per byte are
        out["heldout-bits-per-byte"] = heldout_bits_per_byte(ws, model)
    return out
