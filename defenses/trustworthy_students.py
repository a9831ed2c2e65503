"""Trustworthy students: FIRST-style calibrated top-5 distillation, with a teacher-hacking monitor.

FIRST (Shum et al. 2024, "FIRST: Teach a Reliable LLM Faster through Efficient Trustworthy
Distillation"): the teacher's knowledge is concentrated in its top few tokens, so the student is
distilled from the teacher's top-5 probabilities renormalized to sum to 1; because a fine-tuned
teacher is over-confident, those targets are first calibrated with a temperature. secure-kd's
reading, where the paper leaves choices open: T is fitted on a held-out calibration set of
(teacher logits, true next token) by minimizing the NLL of softmax(logits / T) over log T
(Guo et al. 2017 temperature scaling, bounded scalar search); the targets are the top-5 of
softmax(teacher / T) renormalized; the student's loss is forward KL to them over the full
vocabulary (the engine's top-k targets with a uniform tail of zero mass). ECE (secure_kd.metrics,
15 equal-width bins over the top-1 probability) is reported for the teacher before and after
scaling, and for students distilled from the raw and from the calibrated top-5.

Teacher hacking (Tiapkin et al. 2025) is watched during the calibrated run by
`secure_kd.teacher_hacking.TeacherHackingMonitor` through the Distiller's `on_step` hook: proxy =
mean KL(teacher || student) on the training prompts, golden = mean KL(oracle || student) on
held-out prompts.

The synthetic setting (tiny, CPU): an oracle (a tiny random Llama with its output layer scaled by
`oracle_logit_scale`) generates all data; the teacher is the oracle with its output layer scaled
by `teacher_overconfidence` (same ranking, too sharp) plus `teacher_noise` times a random matrix
(so the teacher is also wrong in places a student can over-fit).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from scipy.optimize import minimize_scalar
from torch import Tensor, nn

from defenses import DEFENSES
from secure_kd.config import KDConfig, TinyModelConfig, TrainConfig
from secure_kd.data import TokenizedExample
from secure_kd.metrics import expected_calibration_error
from secure_kd.models import build_tiny, resolve_device
from secure_kd.plugins import Plugin, PluginConfig, write_result
from secure_kd.teacher_hacking import MonitorPoint, TeacherHackingMonitor
from secure_kd.topk import TopKLogits
from secure_kd.trainer import Distiller

# --------------------------------------------------------------------------- calibration


def _checked(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [n, classes] and labels [n]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return logits.detach().double().cpu(), labels.detach().long().cpu()


def temperature_nll(logits: Tensor, labels: Tensor, temperature: float) -> float:
    """Mean NLL (nats) of the labels under softmax(logits / T)."""
    logits, labels = _checked(logits, labels)
    return float(torch.nn.functional.cross_entropy(logits / temperature, labels))


def fit_temperature(logits: Tensor, labels: Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """T minimizing the NLL of softmax(logits / T) on held-out (logits, labels); searched over log T."""
    logits, labels = _checked(logits, labels)
    low, high = bounds
    if not 0 < low < 1 < high:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {bounds}")
    found = minimize_scalar(
        lambda log_t: temperature_nll(logits, labels, math.exp(log_t)),
        bounds=(math.log(low), math.log(high)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return math.exp(float(found.x))


def calibration_report(logits: Tensor, labels: Tensor, temperature: float = 1.0, n_bins: int = 15) -> dict:
    """ECE, NLL and accuracy of softmax(logits / T) against the labels."""
    logits, labels = _checked(logits, labels)
    probs = torch.softmax(logits / temperature, dim=-1)
    return {
        "temperature": temperature,
        "ece": expected_calibration_error(probs.numpy(), labels.numpy(), n_bins),
        "nll": temperature_nll(logits, labels, temperature),
        "accuracy": float((probs.argmax(-1) == labels).double().mean()),
    }


def renormalized_topk(logits: Tensor, k: int = 5, temperature: float = 1.0) -> TopKLogits:
    """The top-k of softmax(logits / T), renormalized to sum to 1 (as log-probabilities)."""
    top = torch.topk(logits.float() / temperature, k, dim=-1)
    return TopKLogits(torch.log_softmax(top.values, dim=-1), top.indices)


class FirstTargets:
    """Distiller targets: the live teacher's calibrated, renormalized top-k on each batch."""

    def __init__(self, teacher: nn.Module, k: int, temperature: float) -> None:
        self.teacher, self.k, self.temperature = teacher, k, temperature

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> TopKLogits:
        logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return renormalized_topk(logits, self.k, self.temperature)


# --------------------------------------------------------------------------- the plugin


class TrustworthyConfig(PluginConfig):
    """`secure-kd defend trustworthy_students`: calibrated top-5 KD and teacher-hacking detection."""

    out: str = "runs/defenses/trustworthy_students"
    vocab_size: int = Field(128, ge=8)
    oracle: TinyModelConfig = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    oracle_logit_scale: float = Field(30.0, gt=0)
    teacher_overconfidence: float = Field(3.0, gt=0, description="teacher = oracle's output layer times this")
    teacher_noise: float = Field(0.5, ge=0, description="plus this times a random matrix (teacher errors)")
    student: TinyModelConfig = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2)
    top_k: int = Field(5, ge=1)
    sequence_length: int = Field(16, ge=3)
    n_train: int = Field(16, gt=0, description="training sequences (few, so that hacking can show)")
    n_calibration: int = Field(64, gt=0)
    n_test: int = Field(64, gt=0)
    steps: int = Field(200, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(3e-3, gt=0)
    eval_every: int = Field(10, gt=0)
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0)
    n_bins: int = Field(15, ge=1)


class StudentReport(BaseModel):
    targets_temperature: float
    ece: float
    nll: float
    accuracy: float
    ece_after_temperature_scaling: float
    student_temperature: float


class TrustworthyResult(BaseModel):
    kind: str = "trustworthy_students"
    teacher_temperature: float
    teacher_before: dict
    teacher_after: dict
    oracle_test_nll: float
    student_raw_top5: StudentReport
    student_first: StudentReport
    monitor_history: list[MonitorPoint]
    hacking_flagged: bool
    hacking_flagged_at_step: int | None
    seconds: float


def _next_token_pairs(model: nn.Module, sequences: list[tuple[int, ...]]) -> tuple[Tensor, Tensor]:
    """(logits [N, V], next tokens [N]) over every position of every sequence."""
    ids = torch.tensor(sequences)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)


@torch.no_grad()
def sample_sequences(model: nn.Module, n: int, length: int, seed: int) -> list[tuple[int, ...]]:
    """`n` sequences of `length` tokens sampled at T=1 from `model` after a uniformly random first token."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (n, 1), generator=generator)
    for _ in range(length - 1):
        probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return [tuple(row) for row in ids.tolist()]


def mean_kl(reference: nn.Module, student: nn.Module, sequences: list[tuple[int, ...]]) -> float:
    """Mean over positions of KL(reference || student) of the next-token distributions."""
    ids = torch.tensor(sequences)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        log_p = torch.log_softmax(reference(input_ids=ids).logits.float(), -1)
        log_q = torch.log_softmax(student(input_ids=ids).logits.float(), -1)
    student.train(was_training)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def build_models(config: TrustworthyConfig) -> tuple[nn.Module, nn.Module]:
    oracle = build_tiny(config.oracle, config.vocab_size, seed=config.seed)
    teacher = build_tiny(config.oracle, config.vocab_size, seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1)
    with torch.no_grad():
        weight = oracle.get_output_embeddings().weight
        weight.mul_(config.oracle_logit_scale)
        noise = torch.randn(weight.shape, generator=generator) * weight.std() * config.teacher_noise
        teacher.get_output_embeddings().weight.copy_(weight * config.teacher_overconfidence + noise)
    return oracle.eval(), teacher.eval()


def new_student(config: TrustworthyConfig) -> nn.Module:
    return build_tiny(config.student, config.vocab_size, seed=config.seed + 2)


def distil(
    config: TrustworthyConfig,
    student: nn.Module,
    teacher: nn.Module,
    train: list[tuple[int, ...]],
    temperature: float,
    name: str,
    on_step=None,
) -> nn.Module:
    """Distil `student` from the teacher's top-k of softmax(teacher / temperature), renormalized."""
    examples = [TokenizedExample(list(s), list(s), i) for i, s in enumerate(train)]
    kd = KDConfig(loss="forward_kl", top_k=config.top_k, tail="uniform")
    train_cfg = TrainConfig(
        max_steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        checkpoint_every=config.steps,
        precision="fp32",
        schedule="constant",
    )
    Distiller(
        student=student,
        examples=examples,
        kd=kd,
        train=train_cfg,
        out=Path(config.out) / name,
        pad_id=0,
        eos_id=None,
        targets=FirstTargets(teacher, config.top_k, temperature),
        seed=config.seed,
        device="cpu",
        progress=False,
        on_step=on_step,
    ).fit()
    return student.eval()


def student_report(config, student, calibration, test, temperature: float) -> StudentReport:
    calib_logits, calib_labels = _next_token_pairs(student, calibration)
    test_logits, test_labels = _next_token_pairs(student, test)
    before = calibration_report(test_logits, test_labels, 1.0, config.n_bins)
    fitted = fit_temperature(calib_logits, calib_labels)
    after = calibration_report(test_logits, test_labels, fitted, config.n_bins)
    return StudentReport(
        targets_temperature=temperature,
        ece=before["ece"],
        nll=before["nll"],
        accuracy=before["accuracy"],
        ece_after_temperature_scaling=after["ece"],
        student_temperature=fitted,
    )


def run(config: TrustworthyConfig) -> TrustworthyResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    if resolve_device(config.device).type != "cpu":
        raise ValueError("trustworthy_students runs its tiny models on the CPU; set device: cpu or auto")
    if config.top_k > config.vocab_size:
        raise ValueError(f"top_k={config.top_k} exceeds vocab_size={config.vocab_size}")
    oracle, teacher = build_models(config)
    n = config.n_train + config.n_calibration + config.n_test
    sequences = sample_sequences(oracle, n, config.sequence_length, config.seed + 3)
    train = sequences[: config.n_train]
    calibration = sequences[config.n_train : config.n_train + config.n_calibration]
    test = sequences[config.n_train + config.n_calibration :]
    calib_logits, calib_labels = _next_token_pairs(teacher, calibration)
    test_logits, test_labels = _next_token_pairs(teacher, test)
    t_teacher = fit_temperature(calib_logits, calib_labels)
    oracle_logits, _ = _next_token_pairs(oracle, test)

    raw = distil(config, new_student(config), teacher, train, 1.0, "raw_top5")
    first = new_student(config)
    monitor = TeacherHackingMonitor(config.patience, config.min_delta)
    monitor.update(0, mean_kl(teacher, first, train), mean_kl(oracle, first, test))
    hook = monitor.on_step(
        config.eval_every, lambda: mean_kl(teacher, first, train), lambda: mean_kl(oracle, first, test)
    )
    distil(config, first, teacher, train, t_teacher, "first", hook)
    result = TrustworthyResult(
        teacher_temperature=t_teacher,
        teacher_before=calibration_report(test_logits, test_labels, 1.0, config.n_bins),
        teacher_after=calibration_report(test_logits, test_labels, t_teacher, config.n_bins),
        oracle_test_nll=temperature_nll(oracle_logits, test_labels, 1.0),
        student_raw_top5=student_report(config, raw, calibration, test, 1.0),
        student_first=student_report(config, first, calibration, test, t_teacher),
        monitor_history=monitor.history,
        hacking_flagged=monitor.flagged,
        hacking_flagged_at_step=monitor.flagged_at_step,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result


PLUGIN = DEFENSES.register(
    "trustworthy_students",
    Plugin(
        name="trustworthy_students",
        Config=TrustworthyConfig,
        Result=TrustworthyResult,
        run=run,
        summary="FIRST calibrated top-5 KD (ECE before/after) and a teacher-hacking monitor (Tiapkin 2025)",
    ),
)
