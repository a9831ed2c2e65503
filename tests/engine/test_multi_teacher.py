"""Multi-teacher distillation (secure_kd/multi_teacher.py, multi_teacher_config.py): the combined target
against a numpy computation of each rule over the teachers' softmaxes, the trainer's loss on it against a
hand-computed KL, one teacher in a list against `teacher:` (whole jobs), generation from the combined
distribution, and the config's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from secure_kd.config import DistillJob, KDConfig, TinyModelConfig, TrainConfig, load_config
from secure_kd.data import TokenizedExample
from secure_kd.distill_job import run_distill
from secure_kd.models import ModelLoadError, build_tiny
from secure_kd.multi_teacher import TeacherEnsemble
from secure_kd.teacher_targets import LiveTeacher
from secure_kd.trainer import Distiller

VOCAB = 29


def _teacher(seed: int, vocab: int = VOCAB) -> torch.nn.Module:
    model = build_tiny(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), vocab, seed=seed)
    return model.eval()


def _softmaxes(teachers, ids):
    with torch.no_grad():
        return np.stack([torch.softmax(t(input_ids=ids).logits.double(), -1).numpy() for t in teachers])


@pytest.mark.parametrize("rule", ["mean", "weighted_mean", "median", "trimmed_mean"])
def test_combined_target_equals_the_rule_over_the_teachers_softmaxes(rule):
    teachers = [_teacher(s) for s in (1, 2, 3, 4, 5)]
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    p = _softmaxes(teachers, ids)  # [5, 2, 7, vocab]
    expected = {
        "mean": p.mean(0),
        "weighted_mean": np.tensordot(np.array(weights) / sum(weights), p, axes=1),
        "median": np.median(p, axis=0),
        "trimmed_mean": scipy.stats.trim_mean(p, 0.2, axis=0),  # one of five cut at each end
    }[rule]
    expected = expected / expected.sum(-1, keepdims=True)
    ensemble = TeacherEnsemble(teachers, rule, weights=weights if rule == "weighted_mean" else None)
    with torch.no_grad():
        got = torch.softmax(ensemble(input_ids=ids).logits, -1).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)


def test_the_trainers_loss_is_the_kl_to_the_combined_target():
    teachers = [_teacher(s) for s in (1, 2, 3)]
    student = _teacher(9)
    ids = [3, 5, 7, 11, 2, 4, 6, 8]
    kd = KDConfig(loss="forward_kl", top_k=None)
    distiller = Distiller(
        student=student,
        examples=[TokenizedExample(ids, ids, 0)],
        kd=kd,
        train=TrainConfig(max_steps=1, batch_size=1),
        out="unused",
        pad_id=0,
        eos_id=None,
        targets=LiveTeacher(TeacherEnsemble(teachers, "median"), None),
        progress=False,
    )
    batch = distiller.micro_batch(0)
    loss, n = distiller.loss_on(batch)
    p = np.median(_softmaxes(teachers, batch["input_ids"]), axis=0)[0, :-1]
    p = p / p.sum(-1, keepdims=True)
    with torch.no_grad():
        q = torch.softmax(student(input_ids=batch["input_ids"]).logits.double(), -1).numpy()[0, :-1]
    by_hand = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))
    assert n == len(ids) - 1
    assert float(loss) == pytest.approx(by_hand, rel=1e-4)


def _job(tmp_path, name, **changes) -> DistillJob:
    job = load_config(
        "configs/tiny.yaml",
        [
            f"out={tmp_path / name}",
            "train.max_steps=4",
            "kd.teacher_targets=live",
            "train.checkpoint_every=100",
        ],
    )
    data = job.model_dump(exclude={"teacher"}) | changes
    return DistillJob.model_validate(data)


def test_one_teacher_in_a_list_trains_like_teacher(tmp_path):
    quiet = dict(progress=False, log=lambda *a, **k: None)
    single = _job(tmp_path, "one", teacher={"source": "tiny", "tiny": {"hidden_size": 64}})
    listed = _job(tmp_path, "list", teachers=[{"source": "tiny", "tiny": {"hidden_size": 64}}])
    assert listed.teacher == single.teacher
    a, b = run_distill(single, **quiet), run_distill(listed, **quiet)
    assert b.losses == pytest.approx(a.losses, rel=1e-5)
    assert b.student_after.perplexity == pytest.approx(a.student_after.perplexity, rel=1e-5)
    assert b.teachers["rule"] == "mean" and len(b.teachers["members"]) == 1
    assert b.teachers["members"][0]["perplexity"] == pytest.approx(a.teacher_eval.perplexity, rel=1e-6)


def test_three_teachers_from_a_job_differ_and_are_combined(tmp_path):
    tiny = {"source": "tiny", "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}}
    job = _job(tmp_path, "three", teachers=[tiny, tiny, tiny], kd={**_job(tmp_path, "x").kd.model_dump(),
               "teacher_rule": "median", "teacher_targets": "live"})  # fmt: skip
    result = run_distill(job, progress=False, log=lambda *a, **k: None)
    ppl = [m["perplexity"] for m in result.teachers["members"]]
    assert len(set(ppl)) == 3  # seed + 7919 * i: three different random teachers
    assert result.teachers["rule"] == "median" and result.steps == 4


def test_generation_follows_the_combined_distribution():
    # one teacher, greedy, left padding: the same tokens as Hugging Face's generate
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32)).eval()  # fmt: skip
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    options = dict(max_new_tokens=6, pad_token_id=0, do_sample=False)
    ours = TeacherEnsemble([model]).generate(ids, mask, **options)
    theirs = model.generate(input_ids=ids, attention_mask=mask, top_k=None, **options)
    assert ours.tolist() == theirs.tolist()
    # three teachers, greedy: every new token is the argmax of the median target on the text so far
    teachers = [_teacher(s) for s in (1, 2, 3)]
    ensemble = TeacherEnsemble(teachers, "median")
    out = ensemble.generate(ids[1:], mask[1:], **options)
    p = np.median(_softmaxes(teachers, out), axis=0)[0]
    assert out[0, 5:].tolist() == p[4:-1].argmax(-1).tolist()
    # sampling at temperature 1 draws every token with positive combined probability (seeded)
    torch.manual_seed(0)
    sampled = ensemble.generate(ids[1:], mask[1:], max_new_tokens=5, pad_token_id=0, temperature=1.0)
    assert sampled.shape == (1, 10)


def test_teachers_of_other_vocabularies_are_refused(tmp_path):
    with pytest.raises(ValueError, match="vocabularies differ"):
        TeacherEnsemble([_teacher(1), _teacher(2, vocab=VOCAB + 3)])
    saved = tmp_path / "other-vocab"
    _teacher(3, vocab=300).save_pretrained(saved)  # the job's tokenizer (tiny:384) has 384 tokens
    job = _job(tmp_path, "mixed", teachers=[{"source": "tiny"}, {"source": str(saved)}])
    with pytest.raises(ModelLoadError, match=r"teachers\[1\] .* 300 tokens .*share the student's tokenizer"):
        run_distill(job, progress=False, log=lambda *a, **k: None)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"teachers": [{"source": "tiny", "weight": 2.0}]}, r"teachers\[0\].weight is 2.0 .*weighted_mean"),
        ({"teachers": [{"source": "tiny"}] * 2, "kd": {"teacher_rule": "median"}}, "at least 3 teachers"),
        ({"teachers": [{"source": "tiny"}] * 3, "kd": {"teacher_rule": "trimmed_mean"}},
         r"cuts no teacher of 3 .*at least 0.334"),
        ({"teachers": [{"source": "tiny"}] * 3, "kd": {"trim_fraction": 0.4}}, "trimmed_mean only"),
        ({"kd": {"teacher_rule": "median"}}, "apply to a `teachers:` list only"),
        ({"teachers": [{"source": "tiny"}], "teacher": {"source": "tiny", "tiny": {"hidden_size": 32}}},
         "`teacher` and `teachers` are exclusive"),
        ({"teachers": [{"source": "tiny"}], "kd": {"teacher_targets": "cache"}}, "teacher_targets: live"),
        ({"teachers": [{"source": "tiny"}, {"source": "tiny", "tokenizer": "tiny:300"}]},
         r"teachers\[1\].tokenizer .*share the student's tokenizer"),
        ({"teachers": [{"source": "tiny"}], "student": {"source": "tiny", "tokenizer": "tiny:300"}},
         "student.tokenizer"),
        ({"teachers": [{"source": "teacher_layers", "layers": [0]}]},
         r"teachers\[0\].source 'teacher_layers'"),
    ],
)  # fmt: skip
def test_config_refusals_name_the_field_and_the_fix(changes, message):
    with pytest.raises(ValidationError, match=message):
        DistillJob.model_validate({"tokenizer": "tiny:384", **changes})


def test_a_dumped_job_with_teachers_reloads():
    job = DistillJob.model_validate(
        {"tokenizer": "tiny:384", "teachers": [{"source": "tiny"}] * 3, "kd": {"teacher_rule": "median"}}
    )
    again = DistillJob.model_validate(job.model_dump(mode="json"))
    assert again.teacher == job.teacher and again.teachers == job.teachers
