"""The models every participant builds the same way from the job, and the plain steps on them that both
sides run.

`build_student` / `build_teacher`: an organization's initial student (the same one for every
organization and the server in fedavg, seeded from the job) and the job's teacher. `flat_parameters` /
`load_parameters`: the parameters fedavg shares, out of and into a model. `train_on_labels` and
`mean_loss`: language modelling on labelled examples and the mean next-token loss, which the PATE
server runs on its own student and every organization runs in its evaluation. No private data here:
what an organization does with its own records is `federation.client.training`.
"""

from __future__ import annotations

import shutil
from typing import Any

import torch
from torch import nn

from federation.config import FederatedJob
from federation.job_data import JobData
from secure_kd.config import KDConfig, TrainConfig
from secure_kd.data import TokenizedExample, collate
from secure_kd.evaluate import perplexity
from secure_kd.models import load_student, load_teacher
from secure_kd.trainer import Distiller


def build_teacher(job: FederatedJob, public: JobData) -> nn.Module | None:
    """The job's teacher (frozen, on the CPU), or None when the job has none."""
    if job.teacher is None:
        return None
    return load_teacher(job.teacher, vocab_size=public.vocab_size, seed=job.seed, pad_token_id=public.pad_id)


def build_student(
    job: FederatedJob, index: int, public: JobData, *, teacher: nn.Module | None = None
) -> nn.Module:
    """Organization `index`'s initial student. In fedavg every organization (and the server) builds the
    same one from the job's seed; heterogeneous students get a seed per organization.

    `student.source: teacher_layers` copies layers of the job's teacher: `teacher` when given (an
    organization passes the one it already holds), otherwise it is loaded here (the server of fedavg
    and pate builds the initial student too)."""
    cfg = job.student_for(index)
    heterogeneous = bool(job.students) and job.mode != "fedavg"
    seed = job.seed + (1000 * index if heterogeneous else 0)
    if cfg.source == "teacher_layers" and teacher is None:
        teacher = build_teacher(job, public)
    student = load_student(
        cfg,
        teacher=teacher if cfg.source == "teacher_layers" else None,
        vocab_size=public.vocab_size,
        seed=seed,
        pad_token_id=public.pad_id,
    )
    privacy = job.train.privacy
    if privacy is not None and privacy.untie_embeddings:
        # DP-SGD trains an untied output layer; every stage and the fedavg server must build that same
        # architecture, or the saved student does not fit the next one built (it failed the final stage)
        from secure_kd.dp.engine import untie_embeddings

        untie_embeddings(student)
    return student


def flat_parameters(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """The parameters a client shares in fedavg: the trainable ones (LoRA adapters only, when present)."""
    names, tensors = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            names.append(name)
            tensors.append(param.detach())
    if not names:
        raise ValueError("the student has no trainable parameters to federate")
    return names, tensors


def load_parameters(model: nn.Module, arrays: dict[str, Any]) -> None:
    """Copy `arrays` (name -> numpy array) into the model's trainable parameters, checking every shape."""
    params = dict(model.named_parameters())
    for name, value in arrays.items():
        if name not in params:
            raise ValueError(f"unknown parameter {name!r} in the global model")
        target = params[name]
        tensor = torch.as_tensor(value)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"parameter {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))


def language_modelling(kd: KDConfig) -> KDConfig:
    return KDConfig.model_validate({**kd.model_dump(), "kd_weight": 0.0, "ce_weight": 1.0})


def train_on_labels(
    model: nn.Module,
    examples: list[TokenizedExample],
    *,
    train: TrainConfig,
    kd: KDConfig,
    pad_id: int,
    eos_id: int | None,
    out,
    seed: int,
    device,
) -> float:
    """Language modelling on `examples` (PATE: the transfer set relabelled with released votes)."""
    distiller = Distiller(
        student=model,
        examples=examples,
        kd=language_modelling(kd),
        train=train.model_copy(update={"privacy": None}),
        out=out,
        pad_id=pad_id,
        eos_id=eos_id,
        seed=seed,
        device=device,
        progress=False,
    )
    fit = distiller.fit()
    shutil.rmtree(out, ignore_errors=True)
    return fit.losses[-1] if fit.losses else float("nan")


def mean_loss(
    model: nn.Module, examples: list[TokenizedExample], *, pad_id: int, limit: int, batch_size: int, device
) -> float:
    """Token-weighted mean next-token NLL on (at most `limit` batches of) `examples`."""
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)][:limit]
    return float(perplexity(model, [collate(c, pad_id=pad_id) for c in chunks], device=device)["nll"])
