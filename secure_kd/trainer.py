"""Distiller: the training loop of secure-kd.

Off-policy KD from a live teacher or the offline cache, on-policy KD (the student samples, mixing
ratio `lmbda` as in GKD), sequence-level KD (the teacher's generations are the targets),
gradient accumulation, bf16 autocast where the device supports it, LoRA students (the model
arrives already wrapped by peft), checkpoints every N steps and exact resume, and a progress bar
with loss, tokens/s and ETA.

Data order is a function of (seed, epoch) only, so a resumed run visits the same batches in the
same order as an uninterrupted one.

A teacher with another tokenizer: `targets` is a `LiveCrossTeacher` or `CachedCrossTeacher`
(secure_kd.cross_teacher) and `vocab` the `VocabPair`; the objective must be a cross-tokenizer one
(`uld`, `span_aligned`) and is called with the batch's alignment. One tokenizer padded to two
widths: give `vocab` and any objective runs on the logits trimmed to the real vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from secure_kd.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from secure_kd.config import KDConfig, TrainConfig
from secure_kd.cross_teacher import CrossTokenizerObjective, PaddedVocabObjective, padded_to_other_width
from secure_kd.cross_tokenizer.vocab import VocabPair
from secure_kd.data import TokenizedExample, collate, epoch_order
from secure_kd.distributed import Distributed, data_parallel, to_device
from secure_kd.distributed import current as current_distributed
from secure_kd.generation import generate_continuations
from secure_kd.losses import fused_linear_kd_loss, get_loss, loss_info
from secure_kd.progress import TrainProgress
from secure_kd.self_distill import TokenShareObjective
from secure_kd.teacher_targets import TeacherTargets, shift_labels


class TrainingInterrupted(RuntimeError):
    """Training stopped on request (Ctrl-C); a checkpoint was saved at `step`."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        self.step, self.checkpoint = step, checkpoint
        super().__init__(
            f"interrupted at step {step}; checkpoint saved in {checkpoint}; run again with --resume"
        )


@dataclass
class FitResult:
    """What `Distiller.fit` did: the number of optimizer steps of the run (`steps`), the loss of each
    step (`losses`, including those before a resume), the target tokens trained on in this call and its
    wall time, and the step it resumed from (None for a fresh run)."""

    steps: int
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None
    stopped_at: int | None = None  # the step an on_step callback ended training at (None: it ran to the end)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def config_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        progress = min(progress, 1.0)
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def output_layer(model: nn.Module) -> nn.Linear:
    return model.get_output_embeddings()


def final_hidden_states(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The hidden states the output layer reads (after the final norm), without computing logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


class Distiller:
    """The distillation training loop: a student trained on `examples` against teacher targets.

    Arguments (keyword-only):
        student: the model to train (a HF causal LM; a peft-wrapped LoRA student works too).
        examples: `TokenizedExample`s (e.g. from `secure_kd.data.tokenize_records`); positions whose
            label is -100 (padding, masked prompts) are not trained on.
        kd: `KDConfig`: the objective (`kd.loss`, `kd.params`), temperature, `kd_weight` / `ce_weight`,
            `mode` (off_policy, on_policy with mixing ratio `lmbda`, seq_kd, self_privileged: `teacher`
            the student's own weights, `targets` a `secure_kd.self_distill.PrivilegedSelfTeacher`),
            top-k and tail policy.
        train: `TrainConfig`: epochs or `max_steps`, batch size, gradient accumulation, learning rate and
            schedule, clipping, precision, `checkpoint_every`.
        out: directory of the checkpoints (`out/checkpoints/step-N`).
        pad_id, eos_id: the tokenizer's padding and end-of-sequence ids.
        teacher: the live teacher model; needed for on_policy and seq_kd, optional otherwise.
        targets: where each batch's teacher distribution comes from: `LiveTeacher(teacher, top_k)` or
            `CachedTeacher(LogitCache, device)` (secure_kd.teacher_targets); needed when kd_weight > 0.
        seed: the data order is a function of (seed, epoch) only, so a resumed run sees the same batches.
        device: where the student trains (it is not moved here).
        run_hash: a hash of everything that defines the run; `fit(resume=True)` refuses a checkpoint
            written under another hash.
        progress: a progress bar with loss, tokens/s and ETA; on_step(step, loss) after every step (a
            callback that returns True ends training after that step, which is saved, e.g.
            `secure_kd.hacking_callback.TeacherHackingCallback`).
        vocab: the student's and teacher's vocabularies (`VocabPair.from_tokenizers`); needed with
            cross-tokenizer targets, and where one tokenizer's logits are padded to two widths.
        distributed: this process's rank among data-parallel processes (`secure_kd.distributed`;
            default: the process group already started, else one process). With N > 1 processes the
            global batch `train.batch_size` is split across the ranks (rank r takes its contiguous
            slice of the same global batch), gradients are averaged by DDP with each rank's loss
            weighted by its share of the global batch's trained tokens, so every step equals the
            one-process step; only rank 0 writes checkpoints and shows progress (docs/distributed.md).

    `fit(resume=False) -> FitResult` trains for `total_steps`, checkpoints every `checkpoint_every`
    steps and at the end, and on Ctrl-C saves a checkpoint and raises `TrainingInterrupted`.
    `secure_kd.dp.DPDistiller` is the same loop with DP-SGD. docs/python-api.md has a tested example.
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        examples: list[TokenizedExample],
        kd: KDConfig,
        train: TrainConfig,
        out: Path,
        pad_id: int,
        eos_id: int | None,
        teacher: nn.Module | None = None,
        targets: TeacherTargets | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        run_hash: str = "",
        progress: bool = True,
        on_step: Callable[[int, float], None] | None = None,
        vocab: VocabPair | None = None,
        distributed: Distributed | None = None,
    ) -> None:
        if not examples:
            raise ValueError("no training examples: the dataset is empty after tokenization")
        if kd.kd_weight > 0 and targets is None:
            raise ValueError("kd_weight > 0 needs teacher targets (a live teacher or a cache)")
        if kd.mode != "off_policy" and teacher is None:
            raise ValueError(f"mode {kd.mode!r} needs a live teacher model")
        self.student, self.teacher, self.targets = student, teacher, targets
        self.examples, self.kd, self.cfg = examples, kd, train
        self.out, self.pad_id, self.eos_id = Path(out), pad_id, eos_id
        self.seed, self.device, self.run_hash = seed, torch.device(device), run_hash
        self.progress, self.on_step = progress, on_step
        self.vocab = vocab
        self.cross_tokenizer = bool(getattr(targets, "cross_tokenizer", False))
        self.objective = self._build_objective()
        self.ce = get_loss("ce")
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters")
        if self.objective_module is not None:
            params += [p for p in self.objective_module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, train, self.total_steps)
        self.autocast_dtype = self._autocast_dtype()
        self.dist = distributed if distributed is not None else current_distributed()
        self._forward_module = self._data_parallel_module()

    # -- setup -------------------------------------------------------------------------------------
    def _build_objective(self):
        entry = get_loss(self.kd.loss)
        info = loss_info(self.kd.loss)
        self.objective_module: nn.Module | None = None
        self.padded_vocab = False
        if self.cross_tokenizer:
            self._check_cross_tokenizer(info.cross_tokenizer)
            return CrossTokenizerObjective(entry, self.vocab)
        if info.cross_tokenizer == "required" and self.kd.kd_weight > 0:
            raise ValueError(
                f"kd.loss {self.kd.loss!r} needs cross-tokenizer targets (LiveCrossTeacher or "
                "CachedCrossTeacher from secure_kd.cross_teacher), which give it the alignment of the two "
                "tokenizations"
            )
        if info.stateful:
            self.objective_module = entry(**self.kd.params).to(self.device)
            entry = self.objective_module
        if self.kd.kd_weight > 0 and self.vocab is not None and padded_to_other_width(self.vocab):
            self.padded_vocab = True
            entry = PaddedVocabObjective(entry, self.vocab)
        if self.kd.mode == "self_privileged" and self.kd.token_share < 1:
            entry = TokenShareObjective(entry, self.kd.token_share)  # secure_kd.self_distill
        return entry

    def _check_cross_tokenizer(self, support: str) -> None:
        if support == "none":
            raise ValueError(
                f"kd.loss {self.kd.loss!r} compares the two models token by token over one vocabulary, "
                "but the teacher and the student have different tokenizers; use kd.loss: uld or "
                "span_aligned (the cross-tokenizer objectives)"
            )
        if self.vocab is None:
            raise ValueError("cross-tokenizer targets need vocab= (VocabPair.from_tokenizers(...))")
        if self.kd.fused:
            raise ValueError("kd.fused has no cross-tokenizer form: set kd.fused: false")
        if self.kd.mode != "off_policy":
            raise ValueError(
                f"mode {self.kd.mode!r} with a teacher of another tokenizer is not supported: the generated "
                "text would have to be re-tokenized for the teacher; use mode: off_policy"
            )

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.cfg.batch_size)

    def _total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.epochs * self.batches_per_epoch / self.cfg.grad_accum))

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.cfg.precision == "fp32":
            return None
        if self.cfg.precision == "bf16":
            return torch.bfloat16
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None  # CPU autocast in bf16 is slower than fp32 on most CPUs

    def _data_parallel_module(self) -> nn.Module | None:
        """DDP over the student (and a stateful objective) when distributed; None in one process."""
        if not self.dist.enabled:
            return None
        return data_parallel(self.student, self.objective_module, final_hidden_states, self.device)

    def _student_forward(self, batch: dict[str, Tensor], *, hidden_only: bool = False) -> Tensor:
        """The student's logits (or final hidden states), through DDP when distributed."""
        if self._forward_module is not None:
            return self._forward_module(batch["input_ids"], batch["attention_mask"], hidden_only=hidden_only)
        if hidden_only:
            return final_hidden_states(self.student, batch)
        return self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    # -- data ----------------------------------------------------------------------------------------
    def micro_batch(self, index: int) -> dict[str, Tensor]:
        """Micro-batch `index` of the run (this rank's slice of it when distributed), on the device."""
        return self._rank_micro_batch(index)[0]

    def _rank_micro_batch(self, index: int) -> tuple[dict[str, Tensor], bool]:
        """(this rank's slice of global micro-batch `index`, whether it is a stand-in for an empty slice).

        A rank whose slice is empty (a last batch smaller than the world) still runs a forward and
        backward, on the global batch's first example with weight 0, so that DDP's collectives match."""
        epoch, position = divmod(index, self.batches_per_epoch)
        order = epoch_order(len(self.examples), epoch, self.seed)
        ids = order[position * self.cfg.batch_size : (position + 1) * self.cfg.batch_size]
        stand_in = False
        if self.dist.enabled:
            ids, stand_in = (self.dist.shard(ids), False) if self.dist.shard(ids) else (ids[:1], True)
        batch = collate([self.examples[i] for i in ids], pad_id=self.pad_id)
        batch["example_index"] = torch.tensor(ids, dtype=torch.long)
        return to_device(batch, self.device), stand_in

    # -- one step --------------------------------------------------------------------------------------
    def _policy_batch(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        generate = dict(
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            max_new_tokens=self.kd.max_new_tokens,
            temperature=self.kd.generation_temperature,
        )
        if self.kd.mode == "seq_kd":
            return generate_continuations(self.teacher, batch, **generate)
        on_policy = self.kd.mode in ("on_policy", "self_privileged")
        if on_policy and random.Random(self.seed * 7919 + step).random() < self.kd.lmbda:
            return generate_continuations(self.student, batch, **generate)
        return batch

    def loss_on(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """The weighted KD + CE loss of one collated batch and the number of target tokens in it."""
        labels = shift_labels(batch["labels"])
        n_tokens = int((labels != -100).sum())
        kd = self.kd
        loss = torch.zeros((), device=self.device)
        teacher = self.targets(batch) if kd.kd_weight > 0 else None
        common = dict(temperature=kd.temperature, tail=kd.tail, chunk_size=kd.chunk_size)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            if kd.fused:
                hidden = self._student_forward(batch, hidden_only=True)
                weight = output_layer(self.student).weight
                if kd.kd_weight > 0:
                    kd_weight = weight[: self.vocab.student.real_size] if self.padded_vocab else weight
                    kd_loss = fused_linear_kd_loss(
                        hidden, kd_weight, teacher, labels, loss=kd.loss, **common, **kd.params
                    )
                    loss = loss + kd.kd_weight * kd_loss * self._t2()
                if kd.ce_weight > 0:
                    loss = loss + kd.ce_weight * fused_linear_kd_loss(
                        hidden, weight, None, labels, loss="ce", chunk_size=kd.chunk_size
                    )
            else:
                logits = self._student_forward(batch)
                if kd.kd_weight > 0:
                    kd_loss = self.objective(logits, teacher, labels, **common, **self._call_params())
                    loss = loss + kd.kd_weight * kd_loss * self._t2()
                if kd.ce_weight > 0:
                    loss = loss + kd.ce_weight * self.ce(logits, None, labels)
        return loss, n_tokens

    def _call_params(self) -> dict:
        return {} if self.objective_module is not None else dict(self.kd.params)

    def _t2(self) -> float:
        return self.kd.temperature**2 if self.kd.scale_by_t2 else 1.0

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step over `grad_accum` micro-batches: (mean loss, target tokens)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.dist.enabled:
            total, tokens = self._data_parallel_backward(step)
        else:
            total, tokens = 0.0, 0
            for micro in range(self.cfg.grad_accum):
                batch = self.micro_batch(step * self.cfg.grad_accum + micro)
                batch = self._policy_batch(batch, step)
                loss, n = self.loss_on(batch)
                (loss / self.cfg.grad_accum).backward()
                total += float(loss.detach()) / self.cfg.grad_accum
                tokens += n
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.max_grad_norm
            )
        self.optimizer.step()
        self.scheduler.step()
        if self.objective_module is not None and hasattr(self.objective_module, "update"):
            self.objective_module.update(total, step + 1, self.total_steps)
        return total, tokens

    def _data_parallel_backward(self, step: int) -> tuple[float, int]:
        """The gradients of one step under DDP; (the global batch's mean loss, its target tokens).

        DDP averages the ranks' gradients: mean_r(grad L_r). For that to be the gradient of the global
        batch's token mean, rank r's loss (the mean over its n_r tokens) is weighted by
        world_size * n_r / N, N the tokens of the global micro-batch (all-reduced before backward).
        The loss reported is sum_r n_r * L_r / N, the same number one process computes."""
        world, accum = self.dist.world_size, self.cfg.grad_accum
        weighted, global_tokens = [], []
        for micro in range(accum):
            batch, stand_in = self._rank_micro_batch(step * accum + micro)
            batch = self._policy_batch(batch, step)
            n_local = 0 if stand_in else int((shift_labels(batch["labels"]) != -100).sum())
            (n_global,) = self.dist.sum([n_local], dtype=torch.int64)
            sync = contextlib.nullcontext() if micro == accum - 1 else self._forward_module.no_sync()
            with sync:
                loss, _ = self.loss_on(batch)
                share = n_local / max(n_global, 1)
                (loss * (share * world / accum)).backward()
            weighted.append(float(loss.detach()) * share)
            global_tokens.append(n_global)
        total = sum(self.dist.sum(weighted)) / accum
        return total, int(sum(global_tokens))

    # -- loop ----------------------------------------------------------------------------------------
    def _save(self, step: int, losses: list[float]) -> Path:
        extra_state = {}
        if self.objective_module is not None:
            extra_state["objective"] = self.objective_module.state_dict()
        return save_checkpoint(
            self.out,
            step=step,
            model=self.student,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            config_hash=self.run_hash,
            extra={"losses": losses},
            extra_state=extra_state,
        )

    def fit(self, *, resume: bool = False) -> FitResult:
        """Train to `total_steps` (from the latest checkpoint in `out` when `resume`); see the class."""
        start, losses, resumed_from = 0, [], None
        if resume and (ckpt := latest_checkpoint(self.out, distributed=self.dist)) is not None:
            start, meta, extra = load_checkpoint(
                ckpt,
                model=self.student,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                config_hash=self.run_hash,
            )
            if self.objective_module is not None and "objective" in extra:
                self.objective_module.load_state_dict(extra["objective"])
            losses, resumed_from = list(meta.get("losses", [])), start
        self.student.train()
        tokens, t0, step, stopped_at = 0, time.perf_counter(), start, None
        with TrainProgress(self.total_steps, start=start, enabled=self.progress) as bar:
            try:
                for step in range(start, self.total_steps):
                    loss, n = self.train_step(step)
                    losses.append(loss)
                    tokens += n
                    bar.update(step + 1, loss=loss, tokens=tokens, seconds=time.perf_counter() - t0)
                    if (step + 1) % self.cfg.checkpoint_every == 0 and step + 1 < self.total_steps:
                        self._save(step + 1, losses)
                    if self.on_step is not None and self.on_step(step + 1, loss) is True:
                        stopped_at = step + 1
                        break
            except KeyboardInterrupt:
                done = len(losses)
                raise TrainingInterrupted(done, self._save(done, losses)) from None
        final = self.total_steps if stopped_at is None else stopped_at
        self._save(final, losses)
        return FitResult(
            steps=final,
            stopped_at=stopped_at,
            losses=losses,
            tokens=tokens,
            seconds=time.perf_counter() - t0,
            resumed_from=resumed_from,
        )


def fit_in_scratch(
    student: nn.Module,
    examples: list[TokenizedExample],
    kd: KDConfig,
    train: TrainConfig,
    *,
    pad_id: int,
    seed: int,
    device: torch.device | str,
    teacher: nn.Module | None = None,
    targets: TeacherTargets | None = None,
    progress: bool = False,
    vocab: VocabPair | None = None,
) -> FitResult:
    """Train `student` in place and keep nothing on disk: a temporary directory, no checkpoints.

    Attacks, defenses and experiments train many throwaway models (shadows, baselines, clones);
    they need the trainer's semantics, not its resumability."""
    import tempfile

    train = train.model_copy(update={"checkpoint_every": 1 << 30})
    student.to(device)
    with tempfile.TemporaryDirectory(prefix="secure-kd-scratch-") as workdir:
        fit = Distiller(
            student=student,
            examples=list(examples),
            kd=kd,
            train=train,
            out=Path(workdir),
            pad_id=pad_id,
            eos_id=None,
            teacher=teacher,
            targets=targets,
            seed=seed,
            device=device,
            progress=progress,
            vocab=vocab,
        ).fit()
    student.eval()
    return fit
