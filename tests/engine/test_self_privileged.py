"""kd.mode: self_privileged (secure_kd.self_distill): the config's refusals, the alignment of the
teacher's privileged input, the loss against TRL's experimental SDFT on identical logits, the token
share against token_selective, and whole jobs (frozen and shared teacher, DP-SGD with its ledger)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from secure_kd.config import ConfigError, DistillJob, KDConfig, load_config
from secure_kd.losses import get_loss
from secure_kd.self_distill import (
    PrivilegedSelfTeacher,
    TokenShareObjective,
    ledger_texts,
    privileged_text,
    self_teacher,
)
from secure_kd.teacher_targets import shift_labels


def _job(tmp_path, **overrides) -> DistillJob:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        rows = [
            {
                "context": f"the code of user {i} is {1000 + 37 * i}",
                "prompt": f"code of user {i}?",
                "completion": f" it is {1000 + 37 * i}",
            }
            for i in range(24)
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [
        f"data.train={data}",
        "data.privileged_field=context",
        "kd.mode=self_privileged",
        "tokenizer=tiny:300",
        "student.tiny.hidden_size=16",
        "student.tiny.num_layers=1",
        "student.tiny.num_heads=2",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.eval_batches=1",
        "kd.max_new_tokens=4",
        "kd.top_k=null",
        f"out={tmp_path / 'run'}",
        "device=cpu",
    ]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, sets)


# -- configuration ---------------------------------------------------------------------------------


def test_self_privileged_needs_the_privileged_field(tmp_path):
    with pytest.raises(ConfigError, match="self_privileged needs data.privileged_field"):
        _job(tmp_path, **{"data.privileged_field": "null"})


def test_a_privileged_field_with_another_mode_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="privileged_field 'context' is set but kd.mode is 'on_policy'"):
        _job(tmp_path, **{"kd.mode": "on_policy"})


def test_token_share_and_self_teacher_belong_to_self_privileged():
    with pytest.raises(ValueError, match="token_share apply to mode: self_privileged only"):
        KDConfig(mode="on_policy", token_share=0.5)
    with pytest.raises(ValueError, match="self_teacher apply to mode: self_privileged only"):
        KDConfig(self_teacher="shared")
    assert KDConfig(mode="self_privileged", token_share=0.5, self_teacher="shared").token_share == 0.5


def test_the_teacher_is_the_student_and_another_teacher_block_is_refused(tmp_path):
    job = _job(tmp_path)
    assert job.teacher.source == job.student.source and job.teacher.tiny == job.student.tiny
    again = DistillJob.model_validate(job.model_dump())  # a dumped job validates again
    assert again.teacher == job.teacher
    with pytest.raises(ConfigError, match="a `teacher` block would be ignored"):
        _job(tmp_path, **{"teacher.tiny.hidden_size": 32})
    with pytest.raises(ConfigError, match="set data.packing: false"):
        _job(tmp_path, **{"data.packing": "true"})


def test_a_missing_or_empty_privileged_context_names_the_record_not_its_text():
    with pytest.raises(ValueError, match=r"record 3 has no field 'context'") as missing:
        privileged_text({"prompt": "secret prompt"}, "context", 3)
    assert "secret prompt" not in str(missing.value)
    with pytest.raises(ValueError, match="record 1 field 'context' .* is empty"):
        privileged_text({"context": "  "}, "context", 1)
    with pytest.raises(ValueError, match="is a int, not a string"):
        privileged_text({"context": 5}, "context", 0)


# -- alignment ---------------------------------------------------------------------------------------


def _batch(rows: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill(mask == 0, -100),
        "example_index": torch.arange(len(rows)),
    }


def test_teacher_logits_are_those_of_the_context_then_the_sequence_moved_to_the_student_positions(tiny_llama):
    model = tiny_llama(vocab=40, hidden=16, seed=1).eval()
    rows = [[1, 5, 6, 7, 8], [1, 9, 10]]  # bos 1 stays first
    contexts = [[20, 21, 22], [30]]
    targets = PrivilegedSelfTeacher(model, contexts, top_k=None, pad_id=0, bos_id=1)
    aligned = targets(_batch(rows))
    for row, context, got in zip(rows, contexts, aligned, strict=True):
        full = torch.tensor([[1, *context, *row[1:]]])
        want = model(input_ids=full).logits[0, len(context) :]  # position t + len(context)
        torch.testing.assert_close(got[: len(row)], want, rtol=1e-5, atol=1e-5)
    # without a bos the context goes first
    plain = PrivilegedSelfTeacher(model, [[20, 21]], top_k=None, pad_id=0, bos_id=None)
    got = plain(_batch([[5, 6, 7]]))[0]
    torch.testing.assert_close(got, model(input_ids=torch.tensor([[20, 21, 5, 6, 7]])).logits[0, 2:])


# -- the loss against TRL's SDFT ---------------------------------------------------------------------


def _trl_sdft():
    return pytest.importorskip("trl.experimental.sdft.sdft_trainer", reason="trl.experimental.sdft")


@pytest.mark.parametrize(
    ("alpha", "loss", "params"),
    [
        (0.0, "forward_kl", {}),
        (1.0, "reverse_kl", {}),
        (0.5, "jsd", {"beta": 0.5}),
        (0.2, "jsd", {"beta": 0.2}),
    ],
)
def test_loss_equals_trl_sdft_full_logits_on_the_same_model_and_tokens(tiny_llama, alpha, loss, params):
    """TRL's SDFTTrainer forwards student (prompt + completion) and teacher (privileged prompt +
    completion), keeps the completion positions and takes the divergence of alpha, mean per
    sequence then over the batch. Where the semantics coincide (no left padding, the teacher prompt
    = context + prompt, temperature 1, full logits) ours must give the same number: our
    reduction="none" is the per-sequence mean, whose batch mean is TRL's loss."""
    sdft = _trl_sdft()
    torch.manual_seed(0)
    student = tiny_llama(vocab=48, hidden=16, seed=3)
    teacher = self_teacher(student, "frozen")
    prompt = torch.randint(2, 48, (3, 4))
    context = torch.randint(2, 48, (3, 5))
    completion = torch.randint(2, 48, (3, 6))
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 4:] = 0  # a shorter completion, right-padded as TRL pads completions
    completion_mask[2, 5:] = 0
    completion = completion.masked_fill(completion_mask == 0, 0)

    stub = SimpleNamespace(
        num_loss_tokens_to_skip=0,
        temperature=1.0,
        model_kwarg_keys=set(),
        accelerator=SimpleNamespace(gather=lambda x: x),
        args=SimpleNamespace(
            distillation_mode="full_logits", distillation_alpha=alpha, distillation_is_clip=None
        ),
        _log_self_distillation_metric=lambda *a: None,
        _get_teacher_context_for_self_distillation=nullcontext,
    )
    stub._forward_logits = lambda **kw: sdft.SDFTTrainer._forward_logits(stub, **kw)
    inputs = {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion,
        "completion_mask": completion_mask,
        "teacher_input_ids": torch.cat([context, prompt, completion], 1),
        "teacher_attention_mask": torch.cat(
            [torch.ones_like(context), torch.ones_like(prompt), completion_mask], 1
        ),
    }
    logits = sdft.SDFTTrainer._compute_teacher_student_logits(stub, student, teacher, inputs)
    trl_loss = sdft.SDFTTrainer._compute_self_distillation_loss(stub, student, inputs, logits)

    # ours: the student's batch is prompt + completion, the completion trained; context per example
    ids = torch.cat([prompt, completion], 1)
    mask = torch.cat([torch.ones_like(prompt), completion_mask], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 4:] = completion.masked_fill(completion_mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "example_index": torch.arange(3)}
    targets = PrivilegedSelfTeacher(teacher, context.tolist(), top_k=None, pad_id=0, bos_id=None)
    objective = get_loss(loss)
    student_logits = student(input_ids=ids, attention_mask=mask).logits
    ours = objective(student_logits, targets(batch), shift_labels(labels), reduction="none", **params)
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-5, atol=1e-6)


# -- the token share ---------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.25, 0.5, 0.8])
def test_token_share_with_forward_kl_is_token_selective_with_that_ratio(share):
    """forward_kl on the selected tokens = token_selective (forward KL on its selection), mean and none."""
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(3, 9, 20, generator=g), torch.randn(3, 9, 20, generator=g) * 3
    labels = torch.randint(0, 20, (3, 9), generator=g)
    labels[0, :3] = -100
    labels[2, 6:] = -100
    ours = TokenShareObjective(get_loss("forward_kl"), share)
    reference = get_loss("token_selective")
    for reduction in ("mean", "none"):
        torch.testing.assert_close(
            ours(student, teacher, labels, reduction=reduction, temperature=1.0),
            reference(student, teacher, labels, reduction=reduction, ratio=share),
        )


def test_token_share_selects_per_example_at_most_the_share_where_the_teacher_is_more_certain():
    from secure_kd.self_distill import selected_labels

    vocab = 10
    student = torch.zeros(2, 6, vocab)  # uniform: maximal entropy everywhere
    teacher = torch.zeros(2, 6, vocab)
    teacher[0, 1, 3] = teacher[0, 4, 3] = 9.0  # confident at 2 positions of example 0
    teacher[1, 2, 3], teacher[1, 0, 3] = 9.0, 4.0  # example 1: position 2 more certain than 0
    labels = torch.ones(2, 6, dtype=torch.long)
    kept = selected_labels(student, teacher, labels, 1 / 3)  # ceil(6 / 3) = 2 per example
    assert (kept[0] != -100).nonzero().flatten().tolist() == [1, 4]
    assert (kept[1] != -100).nonzero().flatten().tolist() == [0, 2]
    kept = selected_labels(student, teacher, labels, 1 / 6)  # 1 per example, the largest gap
    assert (kept[1] != -100).nonzero().flatten().tolist() == [2]


# -- whole jobs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["frozen", "shared"])
def test_a_self_privileged_job_trains_and_leaves_a_frozen_teacher_unchanged(tmp_path, kind, monkeypatch):
    from secure_kd import distill_job

    seen = {}
    real = distill_job.self_teacher

    def spy(student, which):
        teacher = real(student, which)
        seen["teacher"], seen["student"] = teacher, student
        seen["before"] = {k: v.clone() for k, v in teacher.state_dict().items()}
        return teacher

    monkeypatch.setattr(distill_job, "self_teacher", spy)
    job = _job(tmp_path, **{"kd.self_teacher": kind, "kd.lmbda": 1.0, "kd.token_share": 0.5})
    result = distill_job.run_distill(job, progress=False, log=lambda m: None)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    changed = any(not torch.equal(v, seen["before"][k]) for k, v in seen["teacher"].state_dict().items())
    assert (seen["teacher"] is seen["student"]) == (kind == "shared")
    assert changed == (kind == "shared")  # the frozen copy never moves; the shared one is the student


def test_self_privileged_under_dp_sgd_accounts_every_step_in_the_ledger(tmp_path):
    from opacus.accountants import RDPAccountant

    from secure_kd.distill_job import run_distill

    ledgers = tmp_path / "ledgers"
    job = _job(
        tmp_path,
        **{
            "train.privacy.noise_multiplier": 1.0,
            "train.privacy.ledger_dir": str(ledgers),
            "train.privacy.max_grad_norm": 1.0,
            "kd.lmbda": 1.0,
            "kd.self_teacher": "shared",
        },
    )
    result = run_distill(job, progress=False, log=lambda m: None)
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert result.privacy is not None and report["steps"] == 3
    n_train = result.data["train_sequences"]
    assert report["sample_rate"] == pytest.approx(4 / n_train)  # records are the unit, contexts included
    accountant = RDPAccountant()
    for _ in range(3):
        accountant.step(noise_multiplier=1.0, sample_rate=report["sample_rate"])
    assert report["epsilons"]["rdp"] == pytest.approx(accountant.get_epsilon(delta=report["delta"]), rel=1e-9)
    assert report["ledger"]["entries"] == 1


def test_the_ledger_key_covers_the_privileged_context():
    """Two datasets that differ only in their privileged contexts are two datasets to the ledger."""
    from secure_kd.dp.ledger import dataset_key

    records = [{"context": "a", "text": "x"}, {"context": "b", "text": "y"}]
    other = [{"context": "a", "text": "x"}, {"context": "c", "text": "y"}]
    texts = ["x", "y"]
    key, other_key = (dataset_key(ledger_texts(r, texts, "context")) for r in (records, other))
    assert key != other_key
    assert ledger_texts(records, texts, None) == texts
