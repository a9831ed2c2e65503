"""secure_kd/evaluate/teacher_attribution.py on cases with a known answer: a student that is a copy of
teacher 2, a student that routes each record to one of two teachers by its first token, the distance of
one record against a numpy KL, and the Wilson intervals of the shares."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from secure_kd.config import TinyModelConfig
from secure_kd.data import TokenizedExample, collate
from secure_kd.evaluate.teacher_attribution import record_distances, teacher_attribution
from secure_kd.models import build_tiny
from secure_kd.proportions import wilson_interval

VOCAB = 31


def _model(seed: int, vocab: int = VOCAB) -> nn.Module:
    return build_tiny(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), vocab, seed=seed).eval()


def _batches(n: int = 40, length: int = 9, seed: int = 0, first: list[int] | None = None):
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        ids = rng.integers(1, VOCAB, size=length).tolist()
        if first is not None:
            ids[0] = first[i]
        examples.append(TokenizedExample(ids, ids, i))
    return [collate(examples[i : i + 8], pad_id=0) for i in range(0, n, 8)]


class Router(nn.Module):
    """A 'student' answering each record with teacher A's logits if its first token is even, else C's."""

    def __init__(self, a: nn.Module, c: nn.Module) -> None:
        super().__init__()
        self.a, self.c = a, c

    def forward(self, input_ids, attention_mask=None, **kwargs):
        even = (input_ids[:, :1] % 2 == 0)[..., None]
        la = self.a(input_ids=input_ids, attention_mask=attention_mask).logits
        lc = self.c(input_ids=input_ids, attention_mask=attention_mask).logits
        return CausalLMOutput(logits=torch.where(even, la, lc))


def test_a_copy_of_teacher_two_is_attributed_to_teacher_two():
    teachers = [_model(1), _model(2), _model(3)]
    student = copy.deepcopy(teachers[1])
    result = teacher_attribution(student, teachers, _batches(), names=["t1", "t2", "t3"])
    assert result.n_records == 40 and result.closest == [1] * 40
    t2 = result.teachers[1]
    assert (t2.teacher, t2.records, t2.share) == ("t2", 40, 1.0)
    assert t2.mean_kl == pytest.approx(0.0, abs=1e-9)
    assert t2.ci95 == pytest.approx(wilson_interval(40, 40)) and t2.ci95[0] > 0.9
    assert all(s.records == 0 and s.mean_kl > 1e-4 for s in (result.teachers[0], result.teachers[2]))


def test_a_student_routing_records_between_two_teachers_splits_the_shares_as_routed():
    teachers = [_model(1), _model(2), _model(3)]
    first = [2 * (i % 5) + (1 if i % 4 == 0 else 2) for i in range(40)]  # odd when i % 4 == 0
    expected = [0 if f % 2 == 0 else 2 for f in first]
    result = teacher_attribution(Router(teachers[0], teachers[2]), teachers, _batches(first=first))
    assert result.closest == expected
    assert [s.records for s in result.teachers] == [30, 0, 10]
    assert result.teachers[2].ci95 == pytest.approx(wilson_interval(10, 40))


def test_one_records_distance_is_the_mean_kl_over_its_scored_positions():
    student, teacher = _model(5), _model(6)
    ids = [4, 9, 2, 7, 7, 1]
    labels = [-100, -100, 2, 7, 7, 1]  # the prompt is masked: positions 1..4 are scored
    batch = collate([TokenizedExample(ids, labels, 0)], pad_id=0)
    got = float(record_distances(student, [teacher], [batch])[0, 0])
    with torch.no_grad():
        p = torch.softmax(student(input_ids=batch["input_ids"]).logits.double(), -1)[0].numpy()
        q = torch.softmax(teacher(input_ids=batch["input_ids"]).logits.double(), -1)[0].numpy()
    by_hand = np.mean([np.sum(p[t] * (np.log(p[t]) - np.log(q[t]))) for t in (1, 2, 3, 4)])
    assert got == pytest.approx(by_hand, rel=1e-9)


def test_refusals():
    with pytest.raises(ValueError, match="one shared vocabulary"):
        teacher_attribution(_model(1), [_model(2, vocab=VOCAB + 1)], _batches(8))
    with pytest.raises(ValueError, match="at least one teacher"):
        teacher_attribution(_model(1), [], _batches(8))
    with pytest.raises(ValueError, match="2 teachers but 1 names"):
        teacher_attribution(_model(1), [_model(2), _model(3)], _batches(8), names=["a"])
