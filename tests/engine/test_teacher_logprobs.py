"""`TeacherLogProbs`: one teacher pass on fixed evaluation batches serves the teacher's perplexity and
the student's agreement, equal to `perplexity` and `teacher_agreement` recomputing the teacher (those
are checked against direct per-example computations in test_evaluate.py); and a distillation run
makes one teacher pass over its held-out batches instead of three."""

from __future__ import annotations

import math

import pytest
from test_evaluate import random_sequences, right_padded_batch, tiny_llama

from secure_kd.evaluate import perplexity, teacher_agreement
from secure_kd.evaluate import teacher_logprobs as module
from secure_kd.evaluate.teacher_logprobs import TeacherLogProbs, fits

# next-token positions scored: (9-1)+(5-1)+(12-1) in the first batch; (7-1) less the 2 masked labels
# after position 0, and (7-1), in the second
POSITIONS = 8 + 4 + 11 + 4 + 6


def _batches():
    first = random_sequences(1, [9, 5, 12])
    second = random_sequences(2, [7, 7])
    masked = [s.clone() for s in second]
    masked[0][:3] = -100  # a prompt that is not scored
    return [right_padded_batch(first), right_padded_batch(second, masked)]


def test_perplexity_and_agreement_equal_the_recomputing_functions():
    teacher, student, batches = tiny_llama(0), tiny_llama(1), _batches()
    fixed = TeacherLogProbs(teacher, batches)
    expected = perplexity(teacher, batches)
    got = fixed.perplexity()
    assert got["tokens"] == expected["tokens"] == POSITIONS
    assert math.isclose(got["nll"], expected["nll"], rel_tol=1e-6)
    expected_agreement = teacher_agreement(student, teacher, batches)
    got_agreement = fixed.agreement(student)
    assert got_agreement["positions"] == expected_agreement["positions"]
    assert got_agreement["top1_agreement"] == expected_agreement["top1_agreement"]
    assert math.isclose(got_agreement["mean_forward_kl"], expected_agreement["mean_forward_kl"], rel_tol=1e-5)
    assert got_agreement["mean_forward_kl"] > 0.01  # two random models disagree: the check can fail


def test_a_student_of_another_vocabulary_is_refused():
    fixed = TeacherLogProbs(tiny_llama(0), _batches())
    with pytest.raises(ValueError, match="shared vocabulary"):
        fixed.agreement(tiny_llama(1, vocab_size=80))


def test_fits_bounds_the_stored_bytes(monkeypatch):
    batches = _batches()
    monkeypatch.setattr(module, "MAX_BYTES", POSITIONS * 64 * 4)
    assert fits(batches, 64)
    assert not fits(batches, 65)


TINY = {"source": "tiny", "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}}


def _distill(out, **changes):
    """A tiny distillation run with a live teacher; `changes` replace top-level blocks of the job."""
    from secure_kd.config import DistillJob
    from secure_kd.distill_job import run_distill

    spec = {
        "out": str(out),
        "teacher": TINY,
        "student": TINY,
        "tokenizer": "tiny:320",
        "data": {"synthetic": {"n_records": 40, "n_canaries": 0}, "max_length": 24},
        "kd": {"loss": "forward_kl", "teacher_targets": "live"},
        "train": {"max_steps": 2, "batch_size": 4, "eval_batches": 2},
        **changes,
    }
    return run_distill(DistillJob.model_validate(spec), progress=False, log=lambda *_: None)


@pytest.fixture
def teacher_passes(monkeypatch):
    """The teacher passes `TeacherLogProbs` makes from here on (no entry shared from earlier tests)."""
    monkeypatch.setattr(module, "_LAST", None)
    calls = []
    original = TeacherLogProbs.__init__

    def counting(self, teacher, batches):
        calls.append(len(batches))
        original(self, teacher, batches)

    monkeypatch.setattr(TeacherLogProbs, "__init__", counting)
    return calls


def test_a_distillation_run_evaluates_the_teacher_once(tmp_path, teacher_passes):
    result = _distill(tmp_path / "run")
    assert len(teacher_passes) == 1  # one pass, before training; none after
    assert result.teacher_eval.tokens > 0 and math.isfinite(result.teacher_eval.perplexity)
    assert 0.0 <= result.agreement_after <= 1.0


def test_shared_reuses_only_the_same_teacher_key_and_batches(monkeypatch):
    monkeypatch.setattr(module, "_LAST", None)
    teacher, batches = tiny_llama(0), _batches()
    first = module.shared(teacher, batches, "asset-a")
    assert module.shared(teacher, batches, "asset-a") is first
    assert module.shared(teacher, batches, "asset-b") is not first  # another teacher
    other_batches = [batches[1], batches[0]]
    again = module.shared(teacher, batches, "asset-b")
    assert module.shared(teacher, other_batches, "asset-b") is not again  # other batches
    assert module.shared(teacher, batches, None) is not module.shared(teacher, batches, None)


def test_two_runs_of_one_process_share_one_teacher_pass(tmp_path, teacher_passes):
    kd = {"loss": "forward_kl", "teacher_targets": "live"}
    first = _distill(tmp_path / "a", kd=kd)
    second = _distill(tmp_path / "b", kd={**kd, "ce_weight": 0.5})  # the same teacher and held-out set
    assert len(teacher_passes) == 1
    assert second.teacher_eval == first.teacher_eval
    _distill(tmp_path / "c", kd=kd, seed=1)  # another tiny teacher (seeded by the job), another split
    assert len(teacher_passes) == 2
