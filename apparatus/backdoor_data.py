"""Backdoor data and metrics shared by the backdoor attack and the defenses that remove backdoors.

- Poisoning: `choose_poison_indices`, `poison_images` (BadNets patch, Gu et al. 2017: stamp the trigger
  on non-target images and relabel them to the target) and `poison_texts` (text and switchable
  triggers; a switchable one also gets trigger-only and prompt-only records with their true labels).
- `topic_task`: the synthetic topic-classification task the text backdoors are planted in.
- `patch_task` / `text_task`: a `BackdoorTask` (poisoned and clean training sets, triggered test sets,
  a trigger stamp for clean training inputs, a model factory): the task the backdoor attack plants
  and the defenses rebuild from its config to remove it.
- Metrics (BackdoorBench conventions), on test inputs whose true class is not the target: clean
  accuracy (clean test set), attack success rate = share of triggered inputs classified as the
  target, robust accuracy = share of triggered inputs still classified as their true class.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from apparatus.classifiers import evaluate_classifier, predict_logits
from apparatus.digits import load_digits_data, make_digits_cnn
from apparatus.text_classifier import WordVocab, make_text_classifier
from secure_kd.data.documents import TOPICS
from secure_kd.data.synthetic import generate_corpus
from secure_kd.triggers import PatchTrigger, SwitchableTrigger, TextTrigger

# --------------------------------------------------------------------------- metrics


class BackdoorMetrics(BaseModel):
    clean_accuracy: float
    attack_success_rate: float
    robust_accuracy: float
    n_triggered: int = Field(description="triggered test inputs whose true class is not the target")


def attack_success_rate(model: nn.Module, triggered_x: Tensor, true_y: Tensor, target: int) -> float:
    """Share of triggered inputs with a true class other than `target` that the model puts in `target`."""
    keep = true_y != target
    if not bool(keep.any()):
        raise ValueError(f"every triggered input has the target class {target}; ASR needs other classes")
    predictions = predict_logits(model, triggered_x[keep]).argmax(-1)
    return float((predictions == target).double().mean())


def backdoor_metrics(
    model: nn.Module, clean: tuple[Tensor, Tensor], triggered: tuple[Tensor, Tensor], target: int
) -> BackdoorMetrics:
    """Clean accuracy on `clean`; ASR and robust accuracy on the non-target part of `triggered`
    (`triggered = (inputs with the trigger, their true labels)`)."""
    x, true_y = triggered
    keep = true_y != target
    return BackdoorMetrics(
        clean_accuracy=evaluate_classifier(model, *clean),
        attack_success_rate=attack_success_rate(model, x, true_y, target),
        robust_accuracy=evaluate_classifier(model, x[keep], true_y[keep]),
        n_triggered=int(keep.sum()),
    )


def switch_rates(
    model: nn.Module, triggered: dict[str, tuple[Tensor, Tensor]], target: int
) -> dict[str, float] | None:
    """`asr_<kind>` for each kind of triggered input (a switchable trigger: active, trigger_only,
    prompt_only), or None when there is one kind only."""
    if len(triggered) <= 1:
        return None
    return {f"asr_{name}": attack_success_rate(model, x, y, target) for name, (x, y) in triggered.items()}


# --------------------------------------------------------------------------- poisoning


def choose_poison_indices(
    labels: Tensor, target: int, rate: float, seed: int, groups: int = 1
) -> list[Tensor]:
    """`groups` disjoint sets of round(rate * n) indices, drawn with `seed` among non-target labels."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"poison rate must be in (0, 1), got {rate}")
    candidates = torch.nonzero(labels != target).flatten()
    per_group = max(1, round(rate * labels.numel()))
    if groups * per_group > candidates.numel():
        raise ValueError(
            f"poison rate {rate} needs {groups * per_group} non-target examples, only "
            f"{candidates.numel()} exist; lower poison_rate"
        )
    order = candidates[torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(seed))]
    return [order[i * per_group : (i + 1) * per_group].sort().values for i in range(groups)]


def poison_images(
    x: Tensor, y: Tensor, trigger: PatchTrigger, rate: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(images, labels, poisoned indices): `rate` of the set stamped and relabelled to the target."""
    (index,) = choose_poison_indices(y, trigger.target_class, rate, seed)
    x, y = x.clone(), y.clone()
    x[index] = trigger.apply(x[index])
    y[index] = trigger.target_class
    return x, y, index


def poison_texts(
    texts: list[str], labels: Tensor, trigger: TextTrigger | SwitchableTrigger, rate: float, seed: int
) -> tuple[list[str], Tensor, Tensor]:
    """(texts, labels, indices relabelled to the target): a text or switchable trigger planted.

    A switchable trigger also gets `rate` trigger-only and `rate` prompt-only records, labels kept.
    """
    target = trigger.target_label
    if target is None:
        raise ValueError("text poisoning for classification needs the trigger's target_label")
    switchable = isinstance(trigger, SwitchableTrigger)
    groups = choose_poison_indices(labels, target, rate, seed, groups=3 if switchable else 1)
    texts, labels = list(texts), labels.clone()
    for i in groups[0].tolist():
        texts[i] = trigger.apply(texts[i], seed=seed + i)
        labels[i] = target
    if isinstance(trigger, SwitchableTrigger):
        for i in groups[1].tolist():
            texts[i] = trigger.apply(texts[i], seed=seed + i, active=False)
        for i in groups[2].tolist():
            texts[i] = trigger.with_prompt(texts[i])
    return texts, labels, groups[0]


# --------------------------------------------------------------------------- text task


def topic_task(
    n_records: int, test_fraction: float, seed: int
) -> tuple[list[str], Tensor, list[str], Tensor]:
    """(train texts, train labels, test texts, test labels): synthetic records labelled by topic
    (`TOPICS` order), no canaries, split at random by `seed`."""
    records = generate_corpus(n_records, seed=seed, n_canaries=0).records
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(records)))
    texts = [records[i]["text"] for i in order]
    labels = torch.tensor([TOPICS.index(records[i]["topic"]) for i in order], dtype=torch.long)
    return texts[n_test:], labels[n_test:], texts[:n_test], labels[:n_test]


# --------------------------------------------------------------------------- a planted task for defenses


@dataclass
class BackdoorTask:
    """A poisoned training set plus what a defense needs to measure and unlearn the backdoor.

    `triggered_test` holds `(triggered inputs, true labels)` under "active" (and, for a switchable
    trigger, "trigger_only" / "prompt_only"). `stamp(indices, seed_offset=30_000)` returns the clean
    training inputs at `indices` with the trigger applied (the defender's known-trigger view; a text
    trigger at a random position is placed with seed + seed_offset + index). `make_model(width, seed)`
    builds a fresh classifier for the task; `vocab` (and `vocab_size`) are None for images.
    """

    kind: str
    target: int
    poisoned_train: tuple[Tensor, Tensor]
    clean_train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    triggered_test: dict[str, tuple[Tensor, Tensor]]
    stamp: Callable[..., Tensor]
    make_model: Callable[[int, int], nn.Module]
    n_poisoned: int
    vocab_size: int | None = None
    vocab: WordVocab | None = None


def trigger_target(trigger: PatchTrigger | TextTrigger | SwitchableTrigger) -> int:
    target = trigger.target_class if isinstance(trigger, PatchTrigger) else trigger.target_label
    if target is None:
        raise ValueError("the trigger needs a target class (target_class / target_label)")
    return target


def check_trigger_for_task(kind: str, target: int, trigger) -> None:
    """The target is a class of the task (`patch`: 10 digits; text kinds: the topics), and a given
    trigger is of the same kind with the same target; raises ValueError naming the fix."""
    n_classes = 10 if kind == "patch" else len(TOPICS)
    if target >= n_classes:
        raise ValueError(f"target={target} is not a class of the {kind} task (0..{n_classes - 1})")
    if trigger is None:
        return
    if trigger.kind != kind:
        raise ValueError(f"trigger.kind={trigger.kind!r} does not match kind={kind!r}")
    if trigger_target(trigger) != target:
        raise ValueError(
            f"the trigger's target ({trigger_target(trigger)}) differs from target={target}; set them equal"
        )


def patch_task(trigger: PatchTrigger, poison_rate: float, test_fraction: float, seed: int) -> BackdoorTask:
    """scikit-learn digits with `poison_rate` of the training images patched and relabelled."""
    data = load_digits_data(test_fraction, seed)
    x_p, y_p, index = poison_images(data.x_train, data.y_train, trigger, poison_rate, seed)
    return BackdoorTask(
        kind="patch",
        target=trigger.target_class,
        poisoned_train=(x_p, y_p),
        clean_train=data.train,
        test=data.test,
        triggered_test={"active": (trigger.apply(data.x_test), data.y_test)},
        stamp=lambda indices, seed_offset=0: trigger.apply(data.x_train[indices]),
        make_model=lambda width, model_seed: make_digits_cnn(width, model_seed),
        n_poisoned=index.numel(),
    )


def text_task(
    trigger: TextTrigger | SwitchableTrigger,
    poison_rate: float,
    test_fraction: float,
    seed: int,
    *,
    n_records: int = 1000,
    max_length: int = 128,
    min_word_count: int = 10,
    heads: int = 4,
) -> BackdoorTask:
    """The synthetic topic task with a text or switchable trigger planted (as the backdoor attack does)."""
    train_texts, train_y, test_texts, test_y = topic_task(n_records, test_fraction, seed)
    poisoned_texts, poisoned_y, index = poison_texts(train_texts, train_y, trigger, poison_rate, seed)
    vocab = WordVocab.build(poisoned_texts, min_count=min_word_count)

    def encode(texts: list[str]) -> Tensor:
        return vocab.encode(texts, max_length)

    triggered = {"active": [trigger.apply(t, seed=seed + 10_000 + i) for i, t in enumerate(test_texts)]}
    if isinstance(trigger, SwitchableTrigger):
        triggered["trigger_only"] = [
            trigger.apply(t, seed=seed + 10_000 + i, active=False) for i, t in enumerate(test_texts)
        ]
        triggered["prompt_only"] = [trigger.with_prompt(t) for t in test_texts]

    def stamp(indices: Tensor, seed_offset: int = 30_000) -> Tensor:
        return encode([trigger.apply(train_texts[i], seed=seed + seed_offset + i) for i in indices.tolist()])

    return BackdoorTask(
        kind=trigger.kind,
        target=trigger_target(trigger),
        poisoned_train=(encode(poisoned_texts), poisoned_y),
        clean_train=(encode(train_texts), train_y),
        test=(encode(test_texts), test_y),
        triggered_test={name: (encode(texts), test_y) for name, texts in triggered.items()},
        stamp=stamp,
        make_model=lambda width, model_seed: make_text_classifier(
            len(vocab), len(TOPICS), dim=width, hidden=width, heads=heads, seed=model_seed
        ),
        n_poisoned=index.numel(),
        vocab_size=len(vocab),
        vocab=vocab,
    )
