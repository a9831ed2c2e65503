"""A student with one tokenizer distils from a teacher with another (issue 16), on tiny models.

Tokenizer A (the teacher's) is a byte-level BPE of 400 tokens trained on the corpus; tokenizer B (the
student's) one of 320 trained on the reversed corpus, so its merges differ and the two tokenizations
of the same text split it in different places (checked, not assumed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.cache import build_cache
from secure_kd.cache.reader import LogitCache
from secure_kd.config import ConfigError, KDConfig, TinyModelConfig, TrainConfig, load_config, loss_parameters
from secure_kd.cross_teacher import (
    CachedCrossTeacher,
    CrossTokenizerObjective,
    LiveCrossTeacher,
    align_batch,
    stack_example_spans,
)
from secure_kd.cross_tokenizer import VocabPair
from secure_kd.data import collate, generate_corpus, load_records, tokenize_records, train_tiny_tokenizer
from secure_kd.data.paired import tokenize_pairs
from secure_kd.distill_job import run_distill
from secure_kd.fingerprint import token_dataset_fingerprint, tokenizer_fingerprint
from secure_kd.models import build_tiny
from secure_kd.teacher_targets import LiveTeacher, shift_labels
from secure_kd.trainer import Distiller, TrainingInterrupted

QUIET = dict(progress=False, log=lambda *a, **k: None)
TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture(scope="module")
def records():
    return list(generate_corpus(24, seed=0, n_canaries=0).records)


@pytest.fixture(scope="module")
def tok_a(records):
    return train_tiny_tokenizer([r["text"] for r in records], 400)


@pytest.fixture(scope="module")
def tok_b(records):
    return train_tiny_tokenizer([r["text"][::-1] for r in records], 320)


@pytest.fixture(scope="module")
def teacher(tok_a):
    model = build_tiny(TINY, len(tok_a), seed=1).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked distributions: something to learn
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def paired(records, tok_a, tok_b):
    return tokenize_pairs(records[:8], tok_b, tok_a, max_length=40)


@pytest.fixture(scope="module")
def vocab(tok_a, tok_b):
    return VocabPair.from_tokenizers(tok_b, tok_a, student_width=len(tok_b), teacher_width=len(tok_a))


def _inside(ids, spans):
    return [i for i, span in zip(ids, spans, strict=True) if span[0] >= 0]


# -- the same text, two tokenizations ------------------------------------------------------------------


def test_both_sides_cover_the_same_bytes_and_split_them_differently(records, paired, tok_a, tok_b):
    assert len(paired) == 8
    multi = 0
    for pair in paired.pairs:
        text = records[pair.record_index]["text"].encode()
        assert 0 < pair.aligned_start < pair.aligned_end <= len(text)  # plain text: after the first token
        for ids, spans, tok in (
            (pair.student.input_ids, pair.student_spans, tok_b),
            (pair.teacher.input_ids, pair.teacher_spans, tok_a),
        ):
            # decoding the aligned tokens gives back exactly the aligned bytes of the text
            assert tok.decode(_inside(ids, spans)).encode() == text[pair.aligned_start : pair.aligned_end]
            assert max(end for start, end in spans if start >= 0) == pair.aligned_end
            assert spans[0] == (-1, -1)  # the first token is never predicted
        s_ends = {e for s, e in pair.student_spans if s >= 0}
        t_ends = {e for s, e in pair.teacher_spans if s >= 0}
        multi += len(s_ends ^ t_ends)
    assert multi > 50  # many token ends that only one side has: the tokenizers really differ


def test_student_side_is_what_tokenize_records_gives(records, tok_a, tok_b):
    qa = load_records("configs/data/qa_prompt_completion.jsonl")
    for data, length in ((records, 40), (records, 400), (qa, 20), (qa, 64)):
        paired = tokenize_pairs(data, tok_b, tok_a, max_length=length)
        assert paired.students == tokenize_records(data, tok_b, max_length=length)


def test_prompt_positions_are_outside_the_shared_text(tok_a, tok_b):
    qa = list(load_records("configs/data/qa_prompt_completion.jsonl"))[:4]
    for pair in tokenize_pairs(qa, tok_b, tok_a, max_length=64).pairs:
        record = qa[pair.record_index]
        n_prompt = len(tok_b(record["prompt"])["input_ids"])
        assert all(span == (-1, -1) for span in pair.student_spans[:n_prompt])
        assert pair.student.labels[:n_prompt] == [-100] * n_prompt
        text = record["completion"].encode()
        assert pair.aligned_start == 0  # after a prompt, the first completion token is predicted
        assert (
            tok_b.decode(_inside(pair.student.input_ids, pair.student_spans)).encode()
            == text[: pair.aligned_end]
        )


def test_a_truncated_student_cuts_the_teacher_at_a_shared_boundary(records, tok_a, tok_b):
    pair = tokenize_pairs(records[:1], tok_b, tok_a, max_length=12).pairs[0]
    s_inside = [span for span in pair.student_spans if span[0] >= 0]
    t_inside = [span for span in pair.teacher_spans if span[0] >= 0]
    assert s_inside[-1][1] == t_inside[-1][1] == pair.aligned_end
    # the teacher sequence stops at its last aligned token; the student keeps its 12 tokens for CE
    assert pair.teacher_spans[-1][0] >= 0 and len(pair.student) == 12
    assert sum(1 for label in pair.student.labels if label != -100) == 12


def test_chat_templates_that_render_turns_differently_are_refused(tok_a, tok_b):
    other = train_tiny_tokenizer(["hello world"] * 4, 300)
    other.chat_template = (
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
    )
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(ValueError, match="record 0: .*chat templates differ"):
        tokenize_pairs(chat, other, tok_a, max_length=32)
    assert len(tokenize_pairs(chat, tok_b, tok_a, max_length=32)) == 1  # both ChatML: fine


# -- the trainer ---------------------------------------------------------------------------------------


def _distiller(student, paired, targets, vocab, out, loss, steps=8, **train):
    kd = KDConfig(loss=loss, top_k=16)
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=2e-2, schedule="constant", **train)
    return Distiller(
        student=student,
        examples=paired.students,
        kd=kd,
        train=cfg,
        out=out,
        pad_id=0,
        eos_id=0,
        targets=targets,
        vocab=vocab,
        progress=False,
    )


@pytest.mark.parametrize("loss", ["uld", "span_aligned"])
def test_distil_live_and_from_the_cache_the_loss_decreases(loss, tmp_path, paired, teacher, vocab, tok_a):
    live = LiveCrossTeacher(teacher, paired.pairs, top_k=16, vocab=vocab, pad_id=0)
    fit_live = _distiller(
        build_tiny(TINY, vocab.student.width, seed=2), paired, live, vocab, tmp_path / "a", loss
    )
    build_cache(
        teacher,
        [p.teacher.input_ids for p in paired.pairs],
        tmp_path / "cache",
        k=16,
        teacher_id="tiny-a",
        tokenizer_fingerprint=tokenizer_fingerprint(tok_a),
        byte_spans=[p.teacher_spans for p in paired.pairs],
        text_fingerprint=paired.text_fingerprint,
        progress=False,
    )
    cache = LogitCache.open(
        tmp_path / "cache",
        expect_tokenizer=tokenizer_fingerprint(tok_a),
        expect_dataset=token_dataset_fingerprint(p.teacher.input_ids for p in paired.pairs),
        expect_text=paired.text_fingerprint,
    )
    cached = CachedCrossTeacher(cache, [p.student_spans for p in paired.pairs], "cpu")
    student = build_tiny(TINY, vocab.student.width, seed=2)
    fit_cache = _distiller(student, paired, cached, vocab, tmp_path / "b", loss)
    live_losses, cache_losses = fit_live.fit().losses, fit_cache.fit().losses
    for losses in (live_losses, cache_losses):
        assert sum(losses[-2:]) < 0.9 * sum(losses[:2])
    # the cache holds the teacher's tokenization and an 8-bit top-k: the same first loss, nearly
    assert cache_losses[0] == pytest.approx(live_losses[0], rel=2e-2)


def test_resume_gives_the_uninterrupted_run(tmp_path, paired, teacher, vocab):
    live = LiveCrossTeacher(teacher, paired.pairs, top_k=16, vocab=vocab, pad_id=0)

    def run(out, on_step=None, resume=False):
        d = _distiller(build_tiny(TINY, vocab.student.width, seed=2), paired, live, vocab, out, "uld", 6)
        d.on_step = on_step
        return d.fit(resume=resume)

    whole = run(tmp_path / "whole").losses

    def stop(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "cut", on_step=stop)
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 3 and resumed.losses == pytest.approx(whole, rel=1e-5)


def test_per_example_losses_do_not_depend_on_the_batch(paired, teacher, vocab):
    """DP-SGD needs reduction='none' losses of one example to depend on that example only."""
    live = LiveCrossTeacher(teacher, paired.pairs, top_k=None, vocab=vocab, pad_id=0)
    objective = CrossTokenizerObjective(uld_fn(), vocab)
    student = build_tiny(TINY, vocab.student.width, seed=2).eval()

    def losses(indices):
        batch = collate([paired.pairs[i].student for i in indices], pad_id=0)
        batch["example_index"] = torch.tensor(indices)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return objective(logits, live(batch), shift_labels(batch["labels"]), reduction="none")

    together = losses([0, 3, 5])
    alone = torch.cat([losses([i]) for i in (0, 3, 5)])
    assert torch.allclose(together, alone, atol=1e-6) and bool((together > 0).all())


def uld_fn():
    from secure_kd.losses import get_loss

    return get_loss("uld")


def test_the_alignment_targets_are_the_shifted_labels(paired):
    """The trainer's shift: position t holds token t + 1 on both sides, as the labels do."""
    pairs = paired.pairs[:3]
    s = collate([p.student for p in pairs], pad_id=0)
    t = collate([p.teacher for p in pairs], pad_id=0)
    s_spans = stack_example_spans([p.student_spans for p in pairs], s["input_ids"].shape[1])
    t_spans = stack_example_spans([p.teacher_spans for p in pairs], t["input_ids"].shape[1])
    alignment = align_batch(s["input_ids"], s_spans, t["input_ids"], t_spans)
    assert alignment.n_groups > 0
    labels = shift_labels(s["labels"]).reshape(-1)
    assert torch.equal(labels[alignment.student_rows], alignment.student_targets)
    t_labels = shift_labels(t["labels"]).reshape(-1)
    assert torch.equal(t_labels[alignment.teacher_rows], alignment.teacher_targets)


def test_the_trainer_refuses_a_same_vocabulary_objective_across_tokenizers(tmp_path, paired, teacher, vocab):
    live = LiveCrossTeacher(teacher, paired.pairs, top_k=16, vocab=vocab, pad_id=0)
    with pytest.raises(ValueError, match="uld or span_aligned"):
        _distiller(build_tiny(TINY, vocab.student.width, seed=2), paired, live, vocab, tmp_path, "jsd")
    same = LiveTeacher(teacher, 16)
    with pytest.raises(ValueError, match="needs cross-tokenizer targets"):
        _distiller(
            build_tiny(TINY, vocab.teacher.width, seed=2), paired, same, None, tmp_path, "span_aligned"
        )


def test_loss_parameters_exclude_the_per_batch_inputs():
    assert set(loss_parameters("uld")) == set()
    assert set(loss_parameters("span_aligned")) == {
        "beta",
        "matched_weight",
        "unmatched_weight",
        "likelihood_weight",
    }
    with pytest.raises(ConfigError, match="alignment"):
        load_config("configs/tiny.yaml", ["kd.loss=uld", "kd.params={alignment: 1}"])


# -- the job -------------------------------------------------------------------------------------------


CROSS = ["student.tokenizer=tiny:300", "kd.loss=uld", "kd.params={}"]


def test_validate_refuses_jsd_across_tokenizers_naming_the_fix():
    result = CliRunner().invoke(app, ["validate", "configs/tiny.yaml", "--set", "student.tokenizer=tiny:300"])
    assert result.exit_code == 2
    assert "uld" in result.output and "span_aligned" in result.output
    for extra, field in (
        (["student.source=teacher_layers", "student.layers=[0]"], "teacher_layers"),
        (["data.packing=true"], "packing"),
        (["kd.fused=true"], "fused"),
        (["kd.tail=zero"], "tail"),
    ):
        with pytest.raises(ConfigError, match=field):
            load_config("configs/tiny.yaml", CROSS + extra)
    load_config("configs/tiny.yaml", CROSS)  # uld across tokenizers is fine
    load_config("configs/tiny.yaml", ["student.tokenizer=tiny:384"])  # the same tokenizer: jsd is fine


def test_tokenizer_directories_that_differ_are_refused_before_training(tmp_path, tok_a, tok_b):
    tok_a.save_pretrained(tmp_path / "a")
    tok_b.save_pretrained(tmp_path / "b")
    job = load_config(
        "configs/tiny.yaml",
        [f"out={tmp_path / 'run'}", f"tokenizer={tmp_path / 'a'}", f"student.tokenizer={tmp_path / 'b'}"],
    )  # two directories: only loading them tells
    with pytest.raises(ConfigError, match="uld or kd.loss: span_aligned"):
        run_distill(job, **QUIET)
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("targets", ["cache", "live"])
def test_secure_kd_distill_across_tokenizers(tmp_path, targets):
    out = tmp_path / "run"
    overrides = CROSS + [f"out={out}", f"kd.teacher_targets={targets}", "train.max_steps=4"]
    job = load_config("configs/tiny.yaml", overrides)
    result = run_distill(job, **QUIET)
    data = json.loads((out / "results.json").read_text())
    cross = data["cross_tokenizer"]
    assert cross["student_vocab"] == 300 and cross["teacher_vocab"] == 384
    for key in ("teacher_bits_per_byte", "student_bits_per_byte_before", "student_bits_per_byte_after"):
        assert (
            cross[key]["bits_per_byte"] > 0 and cross[key]["bytes"] == cross["teacher_bits_per_byte"]["bytes"]
        )
    assert 0 < cross["agreement_after"]["coverage"] < 1
    assert result.agreement_after == cross["agreement_after"]["top1_agreement"]
    from secure_kd.app.cli import _distill_summary  # per-token perplexities of two tokenizations differ

    line = _distill_summary(result)
    assert "ppl" not in line and f"{cross['student_bits_per_byte_after']['bits_per_byte']:.3f}" in line
    saved = Path(result.student_dir)
    assert json.loads((saved / "config.json").read_text())["vocab_size"] == 300
    assert (saved / "tokenizer.json").is_file() and (out / "student-tokenizer").is_dir()
    if targets == "cache":
        manifest = json.loads((out / "teacher-cache" / "manifest.json").read_text())
        assert manifest["teacher_tokenization"]["text_fingerprint"] == cross["text_fingerprint"]


def test_a_cross_tokenizer_job_resumes(tmp_path):
    base = CROSS + ["train.schedule=constant", "kd.teacher_targets=cache"]
    whole = run_distill(
        load_config("configs/tiny.yaml", base + [f"out={tmp_path / 'w'}", "train.max_steps=6"]), **QUIET
    )
    first = base + [f"out={tmp_path / 'r'}", "train.max_steps=3"]
    run_distill(load_config("configs/tiny.yaml", first), **QUIET)
    again = base + [f"out={tmp_path / 'r'}", "train.max_steps=6"]
    resumed = run_distill(load_config("configs/tiny.yaml", again), resume=True, **QUIET)
    assert resumed.resumed_from == 3 and resumed.losses == pytest.approx(whole.losses, rel=1e-5)


def test_the_example_config_validates_and_names_the_fix_for_jsd():
    job = load_config("configs/cross-tokenizer-tiny.yaml")
    assert job.tokenizers_differ() is True and job.kd.loss == "span_aligned"
    with pytest.raises(ConfigError, match="use kd.loss: uld or kd.loss: span_aligned"):
        load_config("configs/cross-tokenizer-tiny.yaml", ["kd.loss=jsd"])


def test_a_ce_only_student_with_its_own_tokenizer_needs_no_teacher(tmp_path, paired, vocab):
    """The experiment's baseline arm: no KD term, so the two vocabularies are never compared."""
    d = Distiller(
        student=build_tiny(TINY, vocab.student.width, seed=2),
        examples=paired.students,
        kd=KDConfig(loss="ce", kd_weight=0.0, ce_weight=1.0),
        train=TrainConfig(max_steps=2, batch_size=8),
        out=tmp_path,
        pad_id=0,
        eos_id=0,
        vocab=vocab,
        progress=False,
    )
    assert d.fit().steps == 2
