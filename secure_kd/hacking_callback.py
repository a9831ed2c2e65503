"""`train.teacher_hacking` on a distillation job: a `Distiller` step callback that measures a proxy and a
golden metric every N steps, feeds `TeacherHackingMonitor`, records every evaluation and warns or stops.

Proxy: the job's own KD objective (`kd.loss` at `kd.temperature`, through the job's targets: live, cached,
swung, padded) averaged per target token over the first `proxy_batches` training batches of epoch 0 (a
fixed set, the "offline prompts" of Tiapkin et al. 2025). Golden: the student's mean NLL per token on the
first `golden_batches` held-out batches (a stand-in, since a user rarely has an oracle), or with `oracle`
(a model directory of the student's vocabulary width) mean KL(oracle || student) on them. Both are
measured with the student in eval mode and no gradients; its train mode is restored after.

The callback returns True from `on_step` when `action: stop` and the monitor has just flagged: the
Distiller then ends training at that step and saves it (`FitResult.stopped_at`). `summary()` is the
results.json section: the settings, every evaluation (step, proxy, golden, hacking), the flagging step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from secure_kd.config import ModelConfig
from secure_kd.evaluate import perplexity
from secure_kd.evaluate._model_io import evaluation_mode
from secure_kd.losses import get_loss
from secure_kd.models import load_teacher
from secure_kd.teacher_hacking import TeacherHackingConfig, TeacherHackingMonitor
from secure_kd.teacher_targets import shift_labels


class TeacherHackingCallback:
    """Attach with `distiller.on_step = TeacherHackingCallback(config, distiller, golden_batches)`."""

    def __init__(
        self,
        config: TeacherHackingConfig,
        distiller: Any,
        golden_batches: list[dict[str, Tensor]],
        *,
        oracle: nn.Module | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if not golden_batches:
            raise ValueError("train.teacher_hacking needs held-out batches for its golden metric")
        self.config, self.distiller, self.log = config, distiller, log
        self.golden_batches = golden_batches[: config.golden_batches]
        self.proxy_batches = [distiller.micro_batch(i) for i in range(config.proxy_batches)]
        self.oracle = oracle
        self.monitor = TeacherHackingMonitor(config.patience, config.min_delta)
        self.warned = False

    # -- the two metrics -----------------------------------------------------------------------------
    def proxy(self) -> float:
        """The KD objective per target token on the fixed training batches (lower: closer to the teacher)."""
        d, total, tokens = self.distiller, 0.0, 0
        kd = d.kd
        params = {} if d.objective_module is not None else dict(kd.params)
        with evaluation_mode(d.student):
            for batch in self.proxy_batches:
                labels = shift_labels(batch["labels"])
                n = int((labels != -100).sum())
                if n == 0:
                    continue
                logits = d.student(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                value = d.objective(
                    logits.float(),
                    d.targets(batch),
                    labels,
                    temperature=kd.temperature,
                    tail=kd.tail,
                    **params,
                )
                total, tokens = total + float(value) * n, tokens + n
        if tokens == 0:
            raise ValueError("train.teacher_hacking: the proxy batches hold no target token")
        return total / tokens

    def golden(self) -> float:
        """Held-out NLL per token, or mean KL(oracle || student) on the held-out batches."""
        student = self.distiller.student
        device = self.distiller.device
        if self.oracle is None:
            return float(perplexity(student, self.golden_batches, device=device)["nll"])
        kl, total, tokens = get_loss("forward_kl"), 0.0, 0
        with evaluation_mode(student, self.oracle):
            for raw in self.golden_batches:
                batch = {k: v.to(device) for k, v in raw.items() if isinstance(v, Tensor)}
                labels = shift_labels(batch["labels"])
                n = int((labels != -100).sum())
                if n == 0:
                    continue
                args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                s, o = student(**args).logits.float(), self.oracle(**args).logits.float()
                if s.shape != o.shape:
                    raise ValueError(
                        f"train.teacher_hacking.oracle has {o.shape[-1]} logits, the student "
                        f"{s.shape[-1]}: the oracle must share the student's vocabulary"
                    )
                total, tokens = total + float(kl(s, o, labels)) * n, tokens + n
        return total / max(tokens, 1)

    # -- the hook ------------------------------------------------------------------------------------
    def __call__(self, step: int, loss: float) -> bool:
        if step % self.config.every != 0:
            return False
        was = self.monitor.flagged
        flagged = self.monitor.update(step, self.proxy(), self.golden())
        if flagged and not was:
            point = self.monitor.history[-1]
            self.log(
                f"warning: teacher hacking at step {step}: the proxy (distance to the teacher on training "
                f"batches, {point.proxy:.4g}) fell while the golden metric ({point.golden:.4g}) rose for "
                f"{self.config.patience} evaluations in a row"
                + ("; stopping (train.teacher_hacking.action: stop)" if self.config.action == "stop" else "")
            )
        return flagged and not was and self.config.action == "stop"

    def summary(self, stopped_at: int | None) -> dict[str, Any]:
        return {
            **self.config.model_dump(mode="json"),
            "golden_metric": "heldout_nll" if self.oracle is None else "kl_oracle_student",
            "proxy_metric": f"kd.loss {self.distiller.kd.loss} on {len(self.proxy_batches)} training batches",
            "history": [point.model_dump() for point in self.monitor.history],
            "flagged_at_step": self.monitor.flagged_at_step,
            "stopped_at_step": stopped_at,
        }


def oracle_model(path: str, device: torch.device) -> nn.Module:
    """The oracle of `train.teacher_hacking.oracle`, loaded like a teacher directory (frozen, eval)."""
    return load_teacher(ModelConfig(source=path), vocab_size=0, seed=0).to(device)


def attach_to_job(
    job: Any, distiller: Any, golden_batches: list[dict[str, Tensor]], device: torch.device, log
) -> TeacherHackingCallback:
    """`train.teacher_hacking` of a `DistillJob`: the callback, set as the distiller's `on_step`."""
    config = job.train.teacher_hacking
    oracle = oracle_model(config.oracle, device) if config.oracle is not None else None
    callback = TeacherHackingCallback(config, distiller, golden_batches, oracle=oracle, log=log)
    distiller.on_step = callback
    return callback
