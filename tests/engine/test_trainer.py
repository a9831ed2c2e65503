"""The Distiller: learning happens, resume is exact, on-policy and seq-KD generate, fused == unfused."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from secure_kd.checkpoint import ResumeError, latest_checkpoint
from secure_kd.config import KDConfig, TrainConfig
from secure_kd.teacher_targets import LiveTeacher
from secure_kd.trainer import Distiller, TrainingInterrupted

PAD, EOS = 0, 1


def make_distiller(
    tiny_llama, examples, out, *, kd=None, train=None, student_seed=1, on_step=None, run_hash="h", wrap=None
):
    teacher = tiny_llama(hidden=48, layers=2, seed=0).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = tiny_llama(seed=student_seed)
    if wrap is not None:
        student = wrap(student)
    kd = kd or KDConfig(loss="forward_kl", top_k=None)
    train = train or TrainConfig(max_steps=8, batch_size=4, lr=3e-3, checkpoint_every=3, schedule="constant")
    return Distiller(
        student=student,
        teacher=teacher,
        targets=LiveTeacher(teacher, kd.top_k),
        examples=examples,
        kd=kd,
        train=train,
        out=out,
        pad_id=PAD,
        eos_id=EOS,
        seed=0,
        run_hash=run_hash,
        progress=False,
        on_step=on_step,
    )


def test_kd_loss_decreases(tiny_llama, token_examples, tmp_path):
    d = make_distiller(
        tiny_llama,
        token_examples(),
        tmp_path,
        train=TrainConfig(max_steps=40, batch_size=8, lr=1e-2, schedule="constant"),
    )
    result = d.fit()
    assert result.steps == 40 and len(result.losses) == 40
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    assert result.tokens > 0


def test_resume_after_kill_reproduces_the_loss_curve(tiny_llama, token_examples, tmp_path):
    examples = token_examples()
    full = make_distiller(tiny_llama, examples, tmp_path / "full").fit().losses

    def kill(step, loss):
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        make_distiller(tiny_llama, examples, tmp_path / "run", on_step=kill).fit()
    assert latest_checkpoint(tmp_path / "run").name == "step-000003"
    # a fresh process: a new student from a different init; the checkpoint restores everything
    resumed = make_distiller(tiny_llama, examples, tmp_path / "run", student_seed=99).fit(resume=True)
    assert resumed.resumed_from == 3
    assert resumed.losses == pytest.approx(full, rel=1e-6, abs=1e-7)


def test_ctrl_c_saves_and_resumes(tiny_llama, token_examples, tmp_path):
    examples = token_examples()
    full = make_distiller(tiny_llama, examples, tmp_path / "full").fit().losses

    def interrupt(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        make_distiller(tiny_llama, examples, tmp_path / "run", on_step=interrupt).fit()
    assert info.value.step == 4 and info.value.checkpoint.name == "step-000004"
    resumed = make_distiller(tiny_llama, examples, tmp_path / "run").fit(resume=True)
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(full, rel=1e-6, abs=1e-7)


def test_resume_refuses_a_changed_config(tiny_llama, token_examples, tmp_path):
    examples = token_examples()
    make_distiller(tiny_llama, examples, tmp_path, run_hash="a").fit()
    with pytest.raises(ResumeError, match="different configuration"):
        make_distiller(tiny_llama, examples, tmp_path, run_hash="b").fit(resume=True)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_checkpoints_are_private_and_loose_ones_are_tightened(tiny_llama, token_examples, tmp_path):
    out = tmp_path / "run"
    old = out / "checkpoints" / "step-000001"  # left by an earlier version: world-readable
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"old")
    for path, mode in ((out / "checkpoints", 0o755), (old, 0o755), (old / "state.pt", 0o644)):
        path.chmod(mode)
    umask = os.umask(0o022)  # the usual default: files 0644, directories 0755 unless the code says otherwise
    try:
        make_distiller(tiny_llama, token_examples(), out).fit()
    finally:
        os.umask(umask)
    root = out / "checkpoints"
    steps = sorted(root.glob("step-*"))
    assert [p.name for p in steps] == ["step-000006", "step-000008"]  # the last two kept
    assert _mode(root) == 0o700 and all(_mode(p) == 0o700 for p in steps)
    files = [f for p in steps for f in p.iterdir()]
    assert {f.name for f in files} == {"student.safetensors", "state.pt", "trainer.json"}
    assert all(_mode(f) == 0o600 for f in files), {f.name: oct(_mode(f)) for f in files}


def test_an_existing_loose_checkpoint_directory_is_tightened_when_saved_into(
    tiny_llama, token_examples, tmp_path
):
    out = tmp_path / "run"
    stale = out / "checkpoints" / "step-000000"
    stale.mkdir(parents=True)
    (stale / "trainer.json").write_text("{}")
    (out / "checkpoints").chmod(0o755)
    stale.chmod(0o755)
    (stale / "trainer.json").chmod(0o644)
    train = TrainConfig(max_steps=2, batch_size=4, lr=3e-3, checkpoint_every=50, schedule="constant")
    make_distiller(tiny_llama, token_examples(), out, train=train).fit()
    for path in (out / "checkpoints", stale, out / "checkpoints" / "step-000002"):
        assert _mode(path) == 0o700, path
    assert _mode(stale / "trainer.json") == 0o600


def test_fused_path_matches_logits_path(tiny_llama, token_examples, tmp_path):
    examples = token_examples(n=8)
    kd_top = dict(loss="forward_kl", top_k=8, tail="uniform", ce_weight=0.5)
    plain = make_distiller(tiny_llama, examples, tmp_path / "a", kd=KDConfig(**kd_top))
    fused = make_distiller(tiny_llama, examples, tmp_path / "b", kd=KDConfig(**kd_top, fused=True))
    batch = plain.micro_batch(0)
    values = []
    for d in (plain, fused):
        loss, _ = d.loss_on(batch)
        loss.backward()
        values.append(loss.detach())
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=0)
    for pa, pb in zip(plain.student.parameters(), fused.student.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-7)


def test_on_policy_student_generates(tiny_llama, token_examples, tmp_path, monkeypatch):
    calls = []
    d = make_distiller(
        tiny_llama,
        token_examples(n=8),
        tmp_path,
        kd=KDConfig(loss="jsd", top_k=None, mode="on_policy", lmbda=1.0, max_new_tokens=4),
        train=TrainConfig(max_steps=2, batch_size=4, schedule="constant"),
    )
    original = d.student.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(d.student, "generate", spy)
    result = d.fit()
    assert len(calls) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_on_policy_lmbda_zero_never_generates(tiny_llama, token_examples, tmp_path, monkeypatch):
    d = make_distiller(
        tiny_llama,
        token_examples(n=8),
        tmp_path,
        kd=KDConfig(loss="jsd", top_k=None, mode="on_policy", lmbda=0.0),
        train=TrainConfig(max_steps=2, batch_size=4),
    )
    monkeypatch.setattr(d.student, "generate", lambda *a, **k: pytest.fail("student generated"))
    d.fit()


def test_seq_kd_trains_on_teacher_generations(tiny_llama, token_examples, tmp_path, monkeypatch):
    from secure_kd import generation

    seen = []
    real = generation.generate_continuations

    def spy(model, batch, **kwargs):
        new = real(model, batch, **kwargs)
        seen.append((model, batch["input_ids"].shape, new))
        return new

    monkeypatch.setattr("secure_kd.trainer.generate_continuations", spy)
    d = make_distiller(
        tiny_llama,
        token_examples(n=8),
        tmp_path,
        kd=KDConfig(loss="forward_kl", top_k=None, mode="seq_kd", max_new_tokens=3),
        train=TrainConfig(max_steps=1, batch_size=4),
    )
    d.fit()
    ((model, _, new),) = seen
    assert model is d.teacher
    # only generated tokens are trained: every row has <= 3 trained labels, prompts masked
    trained = (new["labels"] != -100).sum(1)
    assert bool((trained <= 3).all()) and bool((trained >= 1).all())


def test_lora_student_trains_only_adapters(tiny_llama, token_examples, tmp_path):
    from secure_kd.config import LoraConfig
    from secure_kd.models import apply_lora

    d = make_distiller(
        tiny_llama,
        token_examples(n=8),
        tmp_path,
        train=TrainConfig(max_steps=2, batch_size=4, lr=1e-2),
        wrap=lambda m: apply_lora(m, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
    )
    before = {n: p.detach().clone() for n, p in d.student.named_parameters()}
    d.fit()
    changed = {n for n, p in d.student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_taid_t_advances_and_is_checkpointed(tiny_llama, token_examples, tmp_path):
    examples = token_examples(n=8)
    kd = KDConfig(loss="taid", top_k=None)
    train = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, checkpoint_every=3, schedule="constant")
    full = make_distiller(tiny_llama, examples, tmp_path / "full", kd=kd, train=train)
    full.fit()
    t_start = full.objective_module.t_start if hasattr(full.objective_module, "t_start") else 0.4
    assert float(full.objective_module.t) > t_start

    def kill(step, loss):
        if step == 4:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        make_distiller(tiny_llama, examples, tmp_path / "run", kd=kd, train=train, on_step=kill).fit()
    resumed = make_distiller(tiny_llama, examples, tmp_path / "run", kd=kd, train=train)
    resumed.fit(resume=True)
    assert float(resumed.objective_module.t) == pytest.approx(float(full.objective_module.t))


def test_lora_adapters_with_the_same_seed_start_identical_and_leave_the_global_rng_alone():
    from secure_kd.config import LoraConfig, TinyModelConfig
    from secure_kd.models import apply_lora, build_tiny

    cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    tiny = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2)

    def adapters(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        model = build_tiny(tiny, 50, seed=0)
        torch.manual_seed(global_seed)  # the caller's RNG state must not matter
        state = torch.get_rng_state()
        wrapped = apply_lora(model, cfg, seed=seed)
        assert torch.equal(state, torch.get_rng_state())  # and must not be advanced
        return {n: p.detach() for n, p in wrapped.named_parameters() if "lora_A" in n}

    a, b, c = adapters(7, 1), adapters(7, 2), adapters(8, 1)
    assert a and all(torch.equal(p, b[n]) for n, p in a.items())
    assert not all(torch.equal(p, c[n]) for n, p in a.items())


def test_seeded_models_built_in_concurrent_threads_are_identical():
    from concurrent.futures import ThreadPoolExecutor

    from secure_kd.config import TinyModelConfig
    from secure_kd.models import build_tiny

    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        models = list(pool.map(lambda s: build_tiny(tiny, 300, seed=s % 2), range(12)))
    for i, model in enumerate(models):
        reference = models[i % 2].state_dict()
        assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())
    assert not torch.equal(models[0].lm_head.weight, models[1].lm_head.weight)
