"""Backdoor unlearning by distillation: NAD, self-distillation with clean anchors, and a trigger search.

- `attention_maps(model, x, p)`: NAD's attention map per chosen layer (Zagoruyko & Komodakis 2017,
  as used by Li et al. ICLR 2021): A = sum over channels of |f|^p, flattened and L2-normalised.
  For `DigitsCNN` the layers are its two conv blocks (spatial maps 8x8 and 4x4). The bag-of-words text
  classifier has no spatial axis; secure-kd's analogue uses (1) a token map, each token's contribution
  to the pooled vector w_{h,t} * e_t summed over heads h and embedding channels as |.|^p, and (2) the
  hidden activation as a channel map |h|^p. Both are our design choice, not from the paper.
- `nad(...)`: Neural Attention Distillation. A copy of the backdoored model is fine-tuned with
  cross-entropy on the defender's small clean set (the teacher); the backdoored model (the student)
  is then trained on the same set with CE + beta * sum_layers mean_batch ||A_s - A_t||_2.
- `self_distill(...)`: SKD-CAG-style self-distillation with clean anchors, as secure-kd implements it
  (the paper's exact losses are not reproduced): a frozen copy of the backdoored model is the teacher.
  On a clean input x the student matches the teacher's soft output at temperature T (keeps clean
  behaviour) plus CE on the label; on the triggered input x' = trigger(x) the student matches the
  teacher's output on the clean anchor x (forward KL at T, T**2-scaled), which pulls the triggered
  behaviour back to the clean one. The trigger is either known or a candidate from `reverse_patch_trigger`
  / `search_trigger_token`.
- `reverse_patch_trigger`: Neural-Cleanse-lite (Wang et al. S&P 2019): for each class c, Adam optimises a
  mask m = sigmoid(a) and pattern q = sigmoid(b) so that (1 - m) x + m q is classified as c, with an L1
  penalty on m; the class whose mask is anomalously small (MAD anomaly index, as in the paper) is the
  suspected target. `search_trigger_token`: for the text model, every vocabulary word is added to the
  clean texts and the word that flips most of them into one class is the candidate (one word only: a
  switchable trigger, which needs a prompt too, is out of its reach).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apparatus.classifiers import predict_logits, train_classifier
from apparatus.digits import DigitsCNN
from apparatus.text_classifier import PAD_ID, UNK_ID, BagOfWordsClassifier


def attention_maps(model: nn.Module, x: Tensor, p: float = 2.0) -> list[Tensor]:
    """Per-layer attention maps `[batch, positions]`, each row L2-normalised (see module docstring)."""
    if isinstance(model, DigitsCNN):
        maps = [f.abs().pow(p).sum(1).flatten(1) for f in model.feature_maps(x)]
    elif isinstance(model, BagOfWordsClassifier):
        weights = model.token_weights(x)  # [b, heads, length]
        embeddings = model.embedding(x)  # [b, length, dim]
        contribution = weights.unsqueeze(-1) * embeddings.unsqueeze(1)  # [b, heads, length, dim]
        maps = [contribution.abs().pow(p).sum((1, 3)), model.features(x).abs().pow(p)]
    else:
        raise ValueError(
            f"attention maps are defined for DigitsCNN and BagOfWordsClassifier, not {type(model).__name__}"
        )
    return [F.normalize(a, dim=1) for a in maps]


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def nad(
    backdoored: nn.Module,
    clean: tuple[Tensor, Tensor],
    *,
    beta: float,
    teacher_epochs: int,
    epochs: int,
    lr: float,
    seed: int,
    p: float = 2.0,
    batch_size: int = 32,
) -> tuple[nn.Module, nn.Module]:
    """(student, fine-tuned teacher); `backdoored` itself is left unchanged."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (attention loss weight), got {beta}")
    teacher = copy.deepcopy(backdoored)
    train_classifier(teacher, clean, teacher_epochs, lr, seed, batch_size=batch_size)
    teacher.eval()
    student = copy.deepcopy(backdoored)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    device = _device(student)
    x_all, y_all = clean
    for _ in range(epochs):
        for index in _batches(len(y_all), batch_size, generator):
            x, y = x_all[index].to(device), y_all[index].to(device)
            student.train()
            loss = F.cross_entropy(student(x), y)
            with torch.no_grad():
                teacher_maps = attention_maps(teacher, x, p)
            for a_s, a_t in zip(attention_maps(student, x, p), teacher_maps, strict=True):
                loss = loss + beta * (a_s - a_t).norm(dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return student.eval(), teacher


def self_distill(
    backdoored: nn.Module,
    clean: tuple[Tensor, Tensor],
    triggered: Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    temperature: float = 2.0,
    anchor_weight: float = 1.0,
    batch_size: int = 32,
) -> nn.Module:
    """Student = copy of `backdoored`; `triggered[i]` is `clean[0][i]` with the (known or candidate)
    trigger. Loss: CE(x) + T^2 KL(t(x) || s(x)) + anchor_weight * T^2 KL(t(x) || s(x'))."""
    x_all, y_all = clean
    if triggered.shape[0] != x_all.shape[0]:
        raise ValueError(
            f"triggered has {triggered.shape[0]} inputs for {x_all.shape[0]} clean ones; pair "
            "each clean input with its triggered copy"
        )
    teacher = copy.deepcopy(backdoored).eval()
    student = copy.deepcopy(backdoored)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 2)
    device = _device(student)

    def kd(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return temperature**2 * F.kl_div(
            F.log_softmax(student_logits / temperature, -1),
            F.log_softmax(teacher_logits / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )

    for _ in range(epochs):
        for index in _batches(len(y_all), batch_size, generator):
            x, y, x_trig = x_all[index].to(device), y_all[index].to(device), triggered[index].to(device)
            with torch.no_grad():
                anchor = teacher(x)
            student.train()
            clean_logits, trig_logits = student(x), student(x_trig)
            loss = (
                F.cross_entropy(clean_logits, y)
                + kd(clean_logits, anchor)
                + anchor_weight * kd(trig_logits, anchor)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return student.eval()


# --------------------------------------------------------------------------- trigger search


@dataclass
class TriggerCandidate:
    """A reverse-engineered trigger: `apply(x)` stamps it; `target` is the class it pushes to."""

    target: int
    apply: Callable[[Tensor], Tensor]
    anomaly_index: float
    scores: list[float]  # per class: mask L1 norm (patch) / best flip rate (text)
    description: str


def anomaly_indices(values: Tensor, mad_floor: float = 1e-12) -> Tensor:
    """Neural Cleanse's anomaly index: |v - median| / (1.4826 * MAD), MAD floored at `mad_floor`."""
    median = values.median()
    mad = (values - median).abs().median().clamp_min(mad_floor)
    return (values - median).abs() / (1.4826 * mad)


def reverse_patch_trigger(
    model: nn.Module,
    x: Tensor,
    num_classes: int,
    *,
    steps: int = 200,
    lr: float = 0.1,
    l1_weight: float = 0.01,
    seed: int = 0,
) -> TriggerCandidate:
    """Neural-Cleanse-lite on images `[n, c, h, w]`: the class with the smallest mask is the candidate."""
    model.eval()
    trainable = [parameter.requires_grad for parameter in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    device = _device(model)
    x = x.to(device)
    generator = torch.Generator().manual_seed(seed)
    masks, patterns, norms = [], [], []
    try:
        for target in range(num_classes):
            mask_logit = (torch.randn(1, 1, *x.shape[-2:], generator=generator) * 0.1 - 2).to(device)
            pattern_logit = (torch.randn(1, *x.shape[1:], generator=generator) * 0.1).to(device)
            mask_logit.requires_grad_(True)
            pattern_logit.requires_grad_(True)
            optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=lr)
            labels = torch.full((x.shape[0],), target, device=device)
            for _ in range(steps):
                mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
                loss = F.cross_entropy(model((1 - mask) * x + mask * pattern), labels)
                loss = loss + l1_weight * mask.abs().sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            masks.append(torch.sigmoid(mask_logit).detach())
            patterns.append(torch.sigmoid(pattern_logit).detach())
            norms.append(float(masks[-1].sum()))
    finally:
        for parameter, flag in zip(model.parameters(), trainable, strict=True):
            parameter.requires_grad_(flag)
    norm_tensor = torch.tensor(norms)
    target = int(norm_tensor.argmin())
    mask, pattern = masks[target].cpu(), patterns[target].cpu()
    return TriggerCandidate(
        target=target,
        apply=lambda images: (1 - mask) * images + mask * pattern,
        anomaly_index=float(anomaly_indices(norm_tensor)[target]),
        scores=norms,
        description=f"mask L1 {norms[target]:.2f} for class {target}",
    )


def add_token(ids: Tensor, token: int) -> Tensor:
    """`ids` with `token` written at each row's first padding position (the last position if full)."""
    out = ids.clone()
    lengths = (ids != PAD_ID).sum(1).clamp_max(ids.shape[1] - 1)
    out[torch.arange(ids.shape[0]), lengths] = token
    return out


def search_trigger_token(
    model: nn.Module, ids: Tensor, labels: Tensor, num_classes: int, vocab_size: int
) -> TriggerCandidate:
    """For every word w (not pad/unk) and class c: share of the texts not of class c that adding w puts
    in c. The (w, c) with the highest share is the candidate; the anomaly index compares the best
    share per word against all words."""
    best_rate = torch.zeros(vocab_size)
    best_class = torch.zeros(vocab_size, dtype=torch.long)
    for token in range(vocab_size):
        if token in (PAD_ID, UNK_ID):
            continue
        predictions = predict_logits(model, add_token(ids, token)).argmax(-1)
        rates = torch.stack(
            [
                ((predictions == c) & (labels != c)).sum() / (labels != c).sum().clamp_min(1)
                for c in range(num_classes)
            ]
        )
        best_rate[token], best_class[token] = rates.max(), rates.argmax()
    token = int(best_rate.argmax())
    per_class = [
        float(best_rate[best_class == c].max()) if bool((best_class == c).any()) else 0.0
        for c in range(num_classes)
    ]
    return TriggerCandidate(
        target=int(best_class[token]),
        apply=lambda batch: add_token(batch, token),
        # most words flip nothing (MAD 0): a floor of one percentage point keeps the index finite
        anomaly_index=float(anomaly_indices(best_rate[2:], mad_floor=0.01)[token - 2]),
        scores=per_class,
        description=f"token id {token} flips {float(best_rate[token]):.2f} of texts",
    )
