"""Peak memory and time of one forward+backward of the distillation objectives, float32, CPU or CUDA.

Variants (each in a fresh subprocess, see benchmarks/_measure.py for the memory method):
  naive_kl              log_softmax of student and teacher, the full [N, V] elementwise KL tensor
                        (F.kl_div, log_target=True), sum, mean, autograd backward.
  trl_jsd               TRL's GKDTrainer.generalized_jsd_loss(beta=0.5), autograd backward.
  chunked_forward_kl / chunked_jsd (dense teacher), chunked_*_topk (TopKLogits k=64, tail="uniform"):
                        secure_kd.losses with its default chunk size.
  naive_linear_kl       logits = hidden @ W.T, the top-k teacher densified (uniform tail), naive KL,
                        autograd backward through the output layer.
  fused_forward_kl_topk secure_kd.losses.fused_linear_kd_loss (the same loss, logits never formed).
Inputs (logits, hidden states, weight, teacher) are built before the measured step and are not
counted; the gradients the step produces are (each step frees them at its end, after the peak).

Ratios: peak memory of each chunked variant / naive_kl; fused / naive_linear_kl. Time ratios use the
minimum of the timed repeats (the least disturbed run on a shared machine); medians are reported too.
Threads: every variant runs with the same `torch.set_num_threads` (default 1, `--threads`). On the
shared 2-core machine this was written on, two OpenMP threads under other users' load made single
operations up to 6x slower and erratic (threads wait for each other at every barrier), which hid
the differences between variants; one thread gives stable, comparable figures.
Default size: 4,096 tokens, vocabulary 49,152 (SmolLM2), hidden 576; `--quick` uses a small size.
Prints one JSON line and writes benchmarks/results/kd_loss.json (kd_loss_quick.json with --quick).
Run: `python benchmarks/kd_loss.py [--quick]`. `--device cuda` runs every variant on the GPU (peak:
`torch.cuda.max_memory_allocated` beyond the inputs, timings synchronized; see _measure.py) and writes
`--out` (default benchmarks/results/kd_loss_cuda.json); the CPU figures are left alone.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from _measure import cuda_info, ratio, run_variant_in_subprocess, write_results

FULL = dict(n_tokens=4096, vocab=49152, hidden=576, k=64)
QUICK = dict(n_tokens=256, vocab=4096, hidden=64, k=16)


def _logits(n_tokens: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, vocab, generator=generator) * 2.0


def _topk_teacher(n_tokens: int, vocab: int, k: int, seed: int):
    from secure_kd.topk import TopKLogits

    rows = []
    for start in range(0, n_tokens, 256):  # built in slices: no full-size teacher in memory
        block = _logits(min(256, n_tokens - start), vocab, seed + start)
        rows.append(TopKLogits.from_logits(block, k))
    return TopKLogits(torch.cat([r.values for r in rows]), torch.cat([r.indices for r in rows]))


def _naive_kl(student: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    student_logp = torch.log_softmax(student, dim=-1)
    elementwise = torch.nn.functional.kl_div(student_logp, teacher_logp, reduction="none", log_target=True)
    return elementwise.sum(-1).mean()


def setup_naive_kl(n_tokens: int, vocab: int, hidden: int, k: int, device: str = "cpu") -> Callable[[], None]:
    student = _logits(n_tokens, vocab, 1).to(device).requires_grad_()
    teacher = _logits(n_tokens, vocab, 2).to(device)

    def step() -> None:
        _naive_kl(student, torch.log_softmax(teacher, dim=-1)).backward()
        student.grad = None

    return step


def setup_trl_jsd(n_tokens: int, vocab: int, hidden: int, k: int, device: str = "cpu") -> Callable[[], None]:
    from trl.experimental.gkd import GKDTrainer

    student = _logits(n_tokens, vocab, 1).to(device).requires_grad_()
    teacher = _logits(n_tokens, vocab, 2).to(device)

    def step() -> None:
        GKDTrainer.generalized_jsd_loss(student[None], teacher[None], beta=0.5).backward()
        student.grad = None

    return step


def setup_chunked(
    n_tokens: int,
    vocab: int,
    hidden: int,
    k: int,
    loss: str,
    teacher: str,
    chunk_size: int | None = None,
    device: str = "cpu",
) -> Callable[[], None]:
    from secure_kd.losses import get_loss

    objective = get_loss(loss)
    student = _logits(n_tokens, vocab, 1).to(device).requires_grad_()
    target = _logits(n_tokens, vocab, 2) if teacher == "dense" else _topk_teacher(n_tokens, vocab, k, 2)
    target = target.to(device)

    def step() -> None:
        objective(student[None], target[None], tail="uniform", chunk_size=chunk_size).backward()
        student.grad = None

    return step


def _linear_inputs(n_tokens: int, vocab: int, hidden: int, device: str = "cpu"):
    generator = torch.Generator().manual_seed(3)
    states = torch.randn(n_tokens, hidden, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).to(device).requires_grad_()
    return states, weight


def setup_naive_linear_kl(
    n_tokens: int, vocab: int, hidden: int, k: int, device: str = "cpu"
) -> Callable[[], None]:
    states, weight = _linear_inputs(n_tokens, vocab, hidden, device)
    teacher = _topk_teacher(n_tokens, vocab, k, 2).to(device)

    def step() -> None:
        logits = states @ weight.T
        probs = teacher.values.exp()
        tail = (1 - probs.sum(-1, keepdim=True)).clamp_min(0) / (vocab - k)
        dense = tail.expand(-1, vocab).clone().scatter_(1, teacher.indices, probs)
        _naive_kl(logits, dense.log()).backward()
        states.grad = weight.grad = None

    return step


def setup_fused(
    n_tokens: int, vocab: int, hidden: int, k: int, chunk_size: int | None = None, device: str = "cpu"
) -> Callable[[], None]:
    from secure_kd.losses import fused_linear_kd_loss

    states, weight = _linear_inputs(n_tokens, vocab, hidden, device)
    teacher = _topk_teacher(n_tokens, vocab, k, 2).to(device)

    def step() -> None:
        fused_linear_kd_loss(
            states, weight, teacher, loss="forward_kl", tail="uniform", chunk_size=chunk_size
        ).backward()
        states.grad = weight.grad = None

    return step


VARIANTS: dict[str, tuple[str, dict]] = {
    "naive_kl": ("setup_naive_kl", {}),
    "trl_jsd": ("setup_trl_jsd", {}),
    "chunked_forward_kl": ("setup_chunked", {"loss": "forward_kl", "teacher": "dense"}),
    "chunked_jsd": ("setup_chunked", {"loss": "jsd", "teacher": "dense"}),
    "chunked_forward_kl_topk": ("setup_chunked", {"loss": "forward_kl", "teacher": "topk"}),
    "chunked_jsd_topk": ("setup_chunked", {"loss": "jsd", "teacher": "topk"}),
    "naive_linear_kl": ("setup_naive_linear_kl", {}),
    "fused_forward_kl_topk": ("setup_fused", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the measured one")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every variant")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    size = QUICK if args.quick else FULL
    measured = {}
    for name, (function, extra) in VARIANTS.items():
        measured[name] = run_variant_in_subprocess(
            f"kd_loss:{function}",
            {**size, **extra},
            repeats=args.repeats,
            warmup=True,
            threads=args.threads,
            device=args.device,
        )
    peak = {name: m["peak_bytes_beyond_inputs"] for name, m in measured.items()}
    fastest = {name: m["time_min_s"] for name, m in measured.items()}
    chunked = [n for n in VARIANTS if n.startswith("chunked_")]
    fused = "fused_forward_kl_topk"
    results = {
        "benchmark": "kd_loss",
        "size": size,
        "dtype": "float32",
        "device": args.device,
        **cuda_info(),
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg()[0],
        "machine": platform.machine(),
        "torch": torch.__version__,
        "peak_mib": {name: round(b / 2**20, 1) for name, b in peak.items()},
        "time_min_s": {name: round(t, 4) for name, t in fastest.items()},
        "time_median_s": {name: round(m["time_median_s"], 4) for name, m in measured.items()},
        "memory_method": measured["naive_kl"]["memory_method"],
        "memory_ratio_vs_naive": {n: ratio(peak[n], peak["naive_kl"]) for n in chunked},
        "logits_grad_ratio_vs_naive": ratio(4 * size["n_tokens"] * size["vocab"], peak["naive_kl"]),
        "time_ratio_vs_naive": {n: ratio(fastest[n], fastest["naive_kl"]) for n in chunked},
        "time_ratio_jsd_vs_trl": {
            n: ratio(fastest[n], fastest["trl_jsd"]) for n in ("chunked_jsd", "chunked_jsd_topk")
        },
        "fused_memory_ratio_vs_naive_linear": ratio(peak[fused], peak["naive_linear_kl"]),
        "fused_time_ratio_vs_naive_linear": ratio(fastest[fused], fastest["naive_linear_kl"]),
        "targets": {"chunked_memory_ratio": 0.3, "fused_memory_ratio": 0.1, "time_ratio": 1.0},
    }
    name = "kd_loss_quick" if args.quick else "kd_loss"
    write_results(name if args.device == "cpu" else f"{name}_{args.device}", results, args.out)


if __name__ == "__main__":
    main()
