"""What the plain-autograd path costs: peak memory and time of one forward+backward, CPU, float32.

Forward KL written three ways (each variant in a fresh subprocess, see benchmarks/_measure.py):
  naive_kl                   log_softmax of both, the full [N, V] elementwise KL, autograd backward.
  analytic_forward_kl        secure_kd.losses.forward_kl: chunked, hand-derived gradient.
  autograd_forward_kl        the same loss as a per-token function under @autograd_loss (chunked,
                             gradient from autograd chunk by chunk), registered by this script.
  *_topk                     the two chunked ones with a TopKLogits teacher (k=64, tail="uniform").
All at the default chunk size. Inputs are built before the measured step and are not counted.

Ratios: peak memory and time of autograd_* / analytic_* (the price of not deriving the gradient) and
of each chunked variant / naive_kl. Default size: 2,048 tokens, vocabulary 49,152 (SmolLM2);
`--quick` uses a small size. One torch thread in every variant (`--threads`), as in kd_loss.py.
Prints one JSON line and writes benchmarks/results/autograd_loss.json (autograd_loss_quick.json with --quick).
Run: `python benchmarks/autograd_loss.py [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

import torch
from _measure import ratio, run_variant_in_subprocess, write_results
from kd_loss import _logits, _naive_kl, _topk_teacher

from secure_kd.losses import TokenDists, autograd_loss, get_loss

FULL = dict(n_tokens=2048, vocab=49152, k=64)
QUICK = dict(n_tokens=256, vocab=4096, k=16)


@autograd_loss("bench_forward_kl_autograd")
def forward_kl_by_autograd(d: TokenDists) -> torch.Tensor:
    return (d.teacher * (d.log_teacher - d.log_student)).sum(-1)


def setup_naive_kl(n_tokens: int, vocab: int, k: int) -> Callable[[], None]:
    student = _logits(n_tokens, vocab, 1).requires_grad_()
    teacher = _logits(n_tokens, vocab, 2)

    def step() -> None:
        _naive_kl(student, torch.log_softmax(teacher, dim=-1)).backward()
        student.grad = None

    return step


def setup_chunked(n_tokens: int, vocab: int, k: int, loss: str, teacher: str) -> Callable[[], None]:
    objective = get_loss(loss)
    student = _logits(n_tokens, vocab, 1).requires_grad_()
    target = _logits(n_tokens, vocab, 2) if teacher == "dense" else _topk_teacher(n_tokens, vocab, k, 2)

    def step() -> None:
        objective(student[None], target[None], tail="uniform").backward()
        student.grad = None

    return step


AUTOGRAD = "bench_forward_kl_autograd"
VARIANTS: dict[str, tuple[str, dict]] = {
    "naive_kl": ("setup_naive_kl", {}),
    "analytic_forward_kl": ("setup_chunked", {"loss": "forward_kl", "teacher": "dense"}),
    "autograd_forward_kl": ("setup_chunked", {"loss": AUTOGRAD, "teacher": "dense"}),
    "analytic_forward_kl_topk": ("setup_chunked", {"loss": "forward_kl", "teacher": "topk"}),
    "autograd_forward_kl_topk": ("setup_chunked", {"loss": AUTOGRAD, "teacher": "topk"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the measured one")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every variant")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    measured = {
        name: run_variant_in_subprocess(
            f"autograd_loss:{function}",
            {**size, **extra},
            repeats=args.repeats,
            warmup=True,
            threads=args.threads,
        )
        for name, (function, extra) in VARIANTS.items()
    }
    peak = {name: m["peak_bytes_beyond_inputs"] for name, m in measured.items()}
    fastest = {name: m["time_min_s"] for name, m in measured.items()}
    chunked = [n for n in VARIANTS if n != "naive_kl"]
    pairs = {"dense": ("autograd_forward_kl", "analytic_forward_kl")}
    pairs["topk"] = ("autograd_forward_kl_topk", "analytic_forward_kl_topk")
    results = {
        "benchmark": "autograd_loss",
        "size": size,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg()[0],
        "machine": platform.machine(),
        "torch": torch.__version__,
        "peak_mib": {name: round(b / 2**20, 1) for name, b in peak.items()},
        "time_min_s": {name: round(t, 4) for name, t in fastest.items()},
        "time_median_s": {name: round(m["time_median_s"], 4) for name, m in measured.items()},
        "memory_method": measured["naive_kl"]["memory_method"],
        "autograd_memory_ratio_vs_analytic": {t: ratio(peak[a], peak[b]) for t, (a, b) in pairs.items()},
        "autograd_time_ratio_vs_analytic": {t: ratio(fastest[a], fastest[b]) for t, (a, b) in pairs.items()},
        "memory_ratio_vs_naive": {n: ratio(peak[n], peak["naive_kl"]) for n in chunked},
        "time_ratio_vs_naive": {n: ratio(fastest[n], fastest["naive_kl"]) for n in chunked},
    }
    write_results("autograd_loss_quick" if args.quick else "autograd_loss", results)


if __name__ == "__main__":
    main()
