"""DPDistiller's machinery: DP-OPD, ghost clipping, logical vs physical batches, secret sampling and
noise, Poisson vs shuffled batches, and the refusals."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier
from transformers import LlamaConfig, LlamaForCausalLM

import secure_kd.trainer as base_trainer
from secure_kd.config import KDConfig, TrainConfig
from secure_kd.data import TokenizedExample
from secure_kd.dp import trainer as dp_trainer
from secure_kd.dp.config import PrivacyConfig
from secure_kd.dp.sampling import SecretRandomness, step_loader
from secure_kd.dp.trainer import DPDistiller
from secure_kd.teacher_targets import LiveTeacher

VOCAB = 64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def examples(token_examples):
    """Records whose first 3 tokens are the prompt (not trained), as an instruction set would be."""
    plain = token_examples(n=16, vocab=VOCAB, min_len=6, max_len=9)
    return [TokenizedExample(e.input_ids, [-100] * 3 + e.input_ids[3:], e.record_index) for e in plain]


def distiller(
    tmp_path, student, examples, *, out="run", kd=None, teacher=None, max_steps=2, batch_size=4, **privacy
) -> DPDistiller:
    privacy.setdefault("ledger_dir", str(tmp_path / "ledgers"))
    privacy.setdefault("noise_multiplier", 1.0)
    train = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=1e-2, privacy=PrivacyConfig(**privacy))
    kd = kd or KDConfig(kd_weight=0.0, ce_weight=1.0)
    targets = LiveTeacher(teacher, kd.top_k) if teacher is not None else None
    return DPDistiller(
        dataset_key="modes",
        student=student,
        teacher=teacher,
        targets=targets,
        examples=examples,
        kd=kd,
        train=train,
        out=tmp_path / out,
        pad_id=0,
        eos_id=1,
        progress=False,
        log=lambda message: None,
    )


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_dp_opd_the_student_writes_and_the_teacher_scores(tmp_path, tiny_llama, examples, monkeypatch):
    writers = []
    real = base_trainer.generate_continuations

    def spy(model, batch, **kwargs):
        writers.append(model)
        out = real(model, batch, **kwargs)
        assert (out["labels"][:, :3] == -100).all()  # the private prompt stays untrained
        return out

    monkeypatch.setattr(base_trainer, "generate_continuations", spy)
    teacher = tiny_llama(vocab=VOCAB, hidden=16, seed=1).eval()
    student = tiny_llama(vocab=VOCAB, hidden=16, seed=2)
    kd = KDConfig(loss="reverse_kl", mode="on_policy", lmbda=1.0, max_new_tokens=3, top_k=8)
    before = weights(student)
    run = distiller(tmp_path, student, examples, kd=kd, teacher=teacher)
    run.fit()
    assert writers and all(model is student for model in writers)
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(student), strict=True))
    assert json.loads((run.out / "privacy.json").read_text())["steps"] == 2


def test_ghost_clipping_trains_a_tied_student_once_untied(tmp_path, examples):
    def tied():
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)

    with pytest.raises(ValueError, match="untie_embeddings: true"):
        distiller(tmp_path, tied(), examples, grad_sample_mode="ghost")
    student = tied()
    run = distiller(tmp_path, student, examples, grad_sample_mode="ghost", untie_embeddings=True)
    run.fit()
    assert student.get_output_embeddings().weight is not student.get_input_embeddings().weight
    assert json.loads((run.out / "privacy.json").read_text())["grad_sample_mode"] == "ghost"


def test_splitting_a_logical_batch_into_physical_ones_changes_nothing(
    tmp_path, tiny_llama, examples, monkeypatch
):
    monkeypatch.setattr(dp_trainer, "SecretRandomness", lambda secret=None: SecretRandomness(1234))
    results = []
    for physical in (1, 8):
        student = tiny_llama(vocab=VOCAB, hidden=16, seed=2)
        distiller(
            tmp_path, student, examples, out=f"p{physical}", batch_size=8, max_physical_batch_size=physical
        ).fit()
        results.append(weights(student))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_noise_and_sampling_come_from_the_run_secret_not_the_job_seed(
    tmp_path, tiny_llama, examples, monkeypatch
):
    trained = []
    for out in ("a", "b"):  # same config, same seed, a fresh secret each
        student = tiny_llama(vocab=VOCAB, hidden=16, seed=2)
        distiller(tmp_path, student, examples, out=out).fit()
        trained.append(weights(student))
    assert any(not torch.allclose(a, b) for a, b in zip(*trained, strict=True))

    monkeypatch.setattr(dp_trainer, "SecretRandomness", lambda secret=None: SecretRandomness(99))
    same = []
    for out in ("c", "d"):
        student = tiny_llama(vocab=VOCAB, hidden=16, seed=2)
        distiller(tmp_path, student, examples, out=out).fit()
        same.append(weights(student))
    for a, b in zip(*same, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_poisson_batches_vary_in_size_and_are_reproducible_from_the_secret():
    def batch(secret: int, step: int) -> list[int]:
        (indices,) = list(
            step_loader(n_records=40, sample_rate=0.25, step=step, randomness=SecretRandomness(secret))
        )
        return indices

    sizes = [len(batch(7, step)) for step in range(300)]
    assert statistics.mean(sizes) == pytest.approx(10, abs=0.6)
    assert statistics.variance(sizes) == pytest.approx(40 * 0.25 * 0.75, rel=0.3)  # binomial, not fixed size
    assert batch(7, 5) == batch(7, 5) and batch(7, 5) != batch(8, 5)


def test_shuffled_batches_cover_each_record_once_per_epoch_and_are_flagged(tmp_path, tiny_llama, examples):
    randomness = SecretRandomness(3)
    epoch = [
        i
        for step in range(4)
        for (indices,) in [
            list(step_loader(n_records=16, sample_rate=0.25, step=step, randomness=randomness, poisson=False))
        ]
        for i in indices
    ]
    assert sorted(epoch) == list(range(16))
    run = distiller(tmp_path, tiny_llama(vocab=VOCAB, hidden=16, seed=2), examples, poisson_sampling=False)
    run.fit()
    report = json.loads((run.out / "privacy.json").read_text())
    assert report["sampling"] == "shuffle" and any("not a proven guarantee" in c for c in report["caveats"])
    # the sentence a compliance report quotes must not claim the Poisson-subsampled analysis
    guarantee = report["guarantee"]
    assert guarantee.startswith("no proven differential privacy bound is claimed: this run")
    assert "Poisson-subsampled" not in guarantee and "-differential privacy for each record" not in guarantee
    assert "Estimate only, computed as if every batch were Poisson-sampled" in guarantee
    assert f"{report['epsilon']:.4g}" in guarantee and report["guarantee_proven"] is False

    # a later Poisson run on the same dataset composes with the shuffled stretch: still no proof
    later = distiller(tmp_path, tiny_llama(vocab=VOCAB, hidden=16, seed=2), examples, out="later")
    later.fit()
    after = json.loads((later.out / "privacy.json").read_text())
    assert after["sampling"] == "poisson" and after["guarantee_proven"] is False
    assert after["guarantee"].startswith(
        "no proven differential privacy bound is claimed: an earlier stretch"
    )
    assert any("earlier stretch in this dataset's ledger used shuffled" in c for c in after["caveats"])


def test_a_poisson_run_states_the_proven_guarantee(tmp_path, tiny_llama, examples):
    run = distiller(tmp_path, tiny_llama(vocab=VOCAB, hidden=16, seed=2), examples)
    run.fit()
    report = json.loads((run.out / "privacy.json").read_text())
    assert report["guarantee_proven"] is True and report["sampling"] == "poisson"
    assert report["guarantee"].startswith(
        f"({report['epsilon']:.4g}, {report['delta']:g})-differential privacy"
    )
    assert "Poisson-subsampled Gaussian mechanism" in report["guarantee"]


def test_refusals_name_the_problem_and_the_fix(tmp_path, tiny_llama, examples):
    student = tiny_llama(vocab=VOCAB, hidden=16, seed=2)
    packed = [TokenizedExample([5, 6, 7], [5, 6, 7], record_index=-1, packed_from=(0, 1))]
    with pytest.raises(ValueError, match="disable packing"):
        distiller(tmp_path, student, packed)
    with pytest.raises(ValueError, match="kd.fused: false"):
        distiller(tmp_path, student, examples, kd=KDConfig(fused=True, kd_weight=0.0, ce_weight=1.0))
    with pytest.raises(ValueError, match="stateless objective"):
        distiller(tmp_path, student, examples, kd=KDConfig(loss="taid"))
    frozen = tiny_llama(vocab=VOCAB, hidden=16, seed=2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        distiller(tmp_path, frozen, examples)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_a_target_needing_too_much_noise_says_how_much(tmp_path, tiny_llama, examples):
    needed = get_noise_multiplier(
        target_epsilon=0.05,
        target_delta=1e-3,
        sample_rate=0.25,
        steps=4,
        accountant="rdp",
        epsilon_tolerance=0.01,
    )
    assert needed > 10
    run = distiller(
        tmp_path,
        tiny_llama(vocab=VOCAB, hidden=16, seed=2),
        examples,
        max_steps=4,
        noise_multiplier=None,
        target_epsilon=0.05,
    )
    expected = f"needs noise_multiplier={needed:.3f}, above max_noise_multiplier=10"
    with pytest.raises(ValueError, match=expected):
        run.fit()
