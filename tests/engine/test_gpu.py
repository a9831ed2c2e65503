"""The GPU path on a CUDA device: the same runs on the GPU as on the CPU (fp32), bf16 autocast, the
chunked and fused losses, the cache reader, DP-SGD in every grad_sample_mode, and DDP over two GPUs.

Every test is skipped where no CUDA device is visible, so the default suite passes without one;
`benchmarks/gpu_check.sh` runs this file on a machine that has one. The CPU result is the reference:
one implementation, two devices. (`SECURE_KD_GPU_TEST_DEVICE=cpu` runs the file with the CPU standing in
for the GPU, to check the tests themselves on a machine without one; every comparison is then exact.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

GPU = torch.device(os.environ.get("SECURE_KD_GPU_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    GPU.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device is visible"
)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """fp32 matrix products on the GPU in full fp32 (no TF32), so that they compare with the CPU's."""
    if GPU.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def distiller_on(device: torch.device, tmp_path: Path, **train):
    from secure_kd.config import KDConfig, TrainConfig
    from secure_kd.teacher_targets import LiveTeacher
    from secure_kd.trainer import Distiller

    teacher = ddp_worker.tiny(seed=1, hidden=48).eval().to(device)
    student = ddp_worker.tiny(seed=2).to(device)
    kd = KDConfig(loss="jsd", params={"beta": 0.5}, top_k=None, ce_weight=0.5)
    return Distiller(
        student=student,
        teacher=teacher,
        targets=LiveTeacher(teacher, None),
        examples=ddp_worker.examples(),
        kd=kd,
        train=TrainConfig(**{"max_steps": 3, "batch_size": 4, "lr": 1e-2, "precision": "fp32", **train}),
        out=tmp_path / device.type,
        pad_id=0,
        eos_id=None,
        seed=0,
        device=device,
        progress=False,
    )


def test_distiller_on_the_gpu_follows_the_cpu_run(tmp_path):
    """Batches pinned and copied without blocking, the loss and the update on the GPU: the loss curve of the
    CPU run within 1e-4 relative."""
    cpu = distiller_on(CPU, tmp_path).fit().losses
    gpu_distiller = distiller_on(GPU, tmp_path)
    gpu = gpu_distiller.fit().losses
    assert all(p.device.type == GPU.type for p in gpu_distiller.student.parameters())
    assert max(abs(a - b) / abs(a) for a, b in zip(cpu, gpu, strict=True)) < 1e-4


def test_bf16_autocast_runs_the_student_in_bf16(tmp_path):
    distiller = distiller_on(GPU, tmp_path, precision="bf16")
    assert distiller.autocast_dtype == torch.bfloat16
    seen = []
    distiller.student.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    losses = distiller.fit().losses
    fp32 = distiller_on(GPU, tmp_path / "fp32").fit().losses
    assert seen and set(seen) == {torch.bfloat16} and all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - fp32[0]) / fp32[0] < 3e-2  # bf16 has 8 bits of mantissa: a loose check


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "reverse_kl"])
def test_chunked_losses_on_the_gpu_match_the_cpu(loss, teacher_kind):
    from secure_kd.losses import get_loss
    from secure_kd.topk import TopKLogits

    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 9, 300, generator=g) * 2
    teacher = torch.randn(2, 9, 300, generator=g) * 2
    labels = torch.randint(0, 300, (2, 9), generator=g)
    labels[0, :3] = -100
    target = teacher if teacher_kind == "dense" else TopKLogits.from_logits(teacher, 16)
    values, grads = [], []
    for device in (CPU, GPU):
        s = student.to(device).requires_grad_()
        value = get_loss(loss)(s, target.to(device), labels.to(device), tail="uniform", chunk_size=5)
        value.backward()
        values.append(value.detach().cpu())
        grads.append(s.grad.cpu())
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_fused_loss_on_the_gpu_matches_the_cpu():
    from secure_kd.losses import fused_linear_kd_loss
    from secure_kd.topk import TopKLogits

    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 7, 32, generator=g), torch.randn(500, 32, generator=g) / 6
    teacher = TopKLogits.from_logits(torch.randn(2, 7, 500, generator=g) * 2, 16)
    labels = torch.randint(0, 500, (2, 7), generator=g)
    out = []
    for device in (CPU, GPU):
        h, w = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
        value = fused_linear_kd_loss(
            h, w, teacher.to(device), labels.to(device), loss="jsd", beta=0.5, chunk_size=4
        )
        value.backward()
        out.append((value.detach().cpu(), h.grad.cpu(), w.grad.cpu()))
    for gpu_tensor, cpu_tensor in zip(out[1], out[0], strict=True):
        torch.testing.assert_close(gpu_tensor, cpu_tensor, rtol=1e-4, atol=1e-6)


def test_cache_reader_serves_gpu_batches(tmp_path):
    """A top-k cache built by a teacher on the GPU; the reader's batches, moved to the GPU from pinned
    memory, equal the CPU's."""
    from secure_kd.cache import LogitCache, build_cache
    from secure_kd.teacher_targets import CachedTeacher

    teacher = ddp_worker.tiny(seed=1, hidden=48).eval().to(GPU)
    sequences = [e.input_ids for e in ddp_worker.examples()]
    build_cache(
        teacher,
        sequences,
        tmp_path,
        k=8,
        teacher_id="tiny",
        tokenizer_fingerprint="t",
        device=str(GPU),
        progress=False,
    )
    from secure_kd.fingerprint import token_dataset_fingerprint

    dataset = token_dataset_fingerprint(sequences)
    cache = LogitCache.open(tmp_path, expect_tokenizer="t", expect_dataset=dataset, expect_k=8)
    batch = {"example_index": torch.tensor([0, 3, 5]), "input_ids": torch.zeros(3, 12, dtype=torch.long)}
    on_gpu, on_cpu = CachedTeacher(cache, GPU)(batch), CachedTeacher(cache, CPU)(batch)
    assert on_gpu.values.device.type == GPU.type
    torch.testing.assert_close(on_gpu.values.cpu(), on_cpu.values)
    assert torch.equal(on_gpu.indices.cpu(), on_cpu.indices)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_dp_step_on_the_gpu_matches_the_cpu(mode):
    """Per-example clipping on the GPU (noise 0: the clipped mean is then deterministic): the update equals
    the CPU's."""
    from secure_kd.data import collate
    from secure_kd.dp.engine import PrivateStudent
    from secure_kd.losses import get_loss

    batch = collate(ddp_worker.examples(6), pad_id=0)
    labels = torch.full_like(batch["labels"], -100)
    labels[:, :-1] = batch["labels"][:, 1:]
    ce = get_loss("ce")
    after = []
    for device in (CPU, GPU):
        student = ddp_worker.tiny(seed=2, tie=False).to(device)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        private = PrivateStudent(
            student, optimizer, noise_multiplier=0.0, max_grad_norm=0.05, expected_batch_size=6, mode=mode
        )
        private.optimizer.zero_grad(set_to_none=True)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        targets = labels.to(device)
        logits = student(**inputs).logits
        private.backward(logits, lambda out, targets=targets: ce(out, None, targets, reduction="none"))
        norms = private.per_sample_norms().detach().cpu()
        private.optimizer.step()
        private.close()
        after.append((norms, [p.detach().cpu() for p in student.parameters()]))
    assert bool((after[0][0] > 0.05).all())  # every example was clipped: the clip factors matter
    torch.testing.assert_close(after[1][0], after[0][0], rtol=1e-4, atol=1e-6)
    for gpu_p, cpu_p in zip(after[1][1], after[0][1], strict=True):
        torch.testing.assert_close(gpu_p, cpu_p, rtol=1e-4, atol=1e-6)


def test_dp_distiller_fits_on_the_gpu(tmp_path):
    """DPDistiller end to end on the GPU: Poisson sampling, the noise drawn by a generator on the GPU,
    the ledger and privacy.json."""
    import json

    spec = {**ddp_worker_dp_spec(), "device": GPU.type}
    result = ddp_worker.run(spec, tmp_path / "out", tmp_path / "report", 0, tmp_path / "ledgers")
    assert len(result["losses"]) == 4 and all(map(lambda x: x == x, result["losses"]))
    report = json.loads((tmp_path / "out" / "privacy.json").read_text())
    assert report["steps"] == 4 and report["epsilon"] > 0


def ddp_worker_dp_spec() -> dict:
    return {
        "kd": {"loss": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.5, "top_k": None},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "precision": "fp32"},
        "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 0.5},
        "secret": 7,
    }


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs")
def test_ddp_over_two_gpus_follows_one_gpu(tmp_path):
    spec = {
        "kd": {"loss": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.5, "top_k": None},
        "train": {"max_steps": 3, "batch_size": 5, "grad_accum": 2, "lr": 1e-2, "precision": "fp32"},
        "device": "cuda",
    }
    one = ddp_worker.run(spec, tmp_path / "one", tmp_path / "r1")
    two = ddp_worker.run_ranks(
        [{"name": "gpu", "spec": spec, "out": str(tmp_path / "two")}], tmp_path / "r2", device="cuda"
    )
    for rank in two["gpu"]:
        assert max(abs(a - b) / abs(a) for a, b in zip(one["losses"], rank["losses"], strict=True)) < 1e-4
