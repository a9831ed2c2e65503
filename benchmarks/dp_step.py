"""Time and peak memory of a DP-SGD step vs a non-DP step, per Opacus grad_sample_mode.

Method. A random Llama student (4 layers, width 256, 4 heads, untied embeddings, vocabulary 8,000)
and one fixed batch of 16 x 64 random tokens, every position trained, with a fixed random teacher
given as its top-64 log-probabilities (uniform tail), the way a cached KD step sees it. Every variant
starts from the same initialization and runs the same work per step: zero_grad, forward, JSD
(beta 0.5), backward, optimizer step (torch AdamW, lr 1e-4), float32:

  non_dp     the plain step: batch-mean loss, one backward, AdamW;
  hooks      Opacus per-example gradients from its layer hooks (RMSNorm by secure-kd's rule), the
             per-example losses (reduction="none") clipped at 1.0, Gaussian noise (sigma 1.0), AdamW;
  functorch  the same with every per-example gradient from torch.func (vmap);
  ghost      ghost clipping: per-example gradient norms without per-example gradients (secure-kd's
             first pass computes activation gradients only, see `PrivateStudent._ghost_backward`),
             then the clipped gradient sum by book-keeping from that pass's layer inputs and output
             gradients (`secure_kd.dp.bookkeeping`), with no second backward;
  ghost_two_pass  the same norms, then Opacus' second backward of the clipped loss (what `ghost` did
             before book-keeping, and what it still does for layer types book-keeping does not know).

A DP step here is exactly what `DPDistiller` runs per physical batch (`secure_kd.dp.engine.PrivateStudent`).
Timing: all variants live in one process; after one untimed warm-up step each, `rounds` rounds time
`steps` steps of every variant in turn (the order rotates each round), so load changes on this shared
machine hit all variants alike. Per step both the wall clock and the process CPU time are recorded;
ratios to the non-DP step are given for the median and the minimum of each. On a machine shared with
other jobs the wall clock swings with their load; CPU time at `--threads 1` does not (at 2 threads it
also counts the threads' spin-waits), which makes it the steadier figure there.
Peak memory: one step in a fresh process per variant (`_measure.run_variant_in_subprocess`: VmHWM
beyond the inputs, i.e. what the step allocates on top of weights and batch).

Target (issue 4): a DP step within 1.5x of the non-DP step, with ghost clipping where the layers allow.
Run from the repository root: `python benchmarks/dp_step.py` (writes benchmarks/results/dp_step.json;
with `--threads N` other than 2, dp_step_threadsN.json) or `--quick` (smaller model, prints only).
`--device cuda` runs every variant on the GPU (each step synchronized; peak memory from
`torch.cuda.max_memory_allocated`, see _measure.py) and writes `--out` (default
benchmarks/results/dp_step_cuda.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from _measure import cuda_info, ratio, run_variant_in_subprocess, write_results

from secure_kd.config import TinyModelConfig
from secure_kd.dp.engine import PrivateStudent
from secure_kd.losses import get_loss
from secure_kd.models import build_tiny
from secure_kd.topk import TopKLogits

VARIANTS = ("non_dp", "hooks", "functorch", "ghost", "ghost_two_pass")
TARGET_RATIO = 1.5


@dataclass(frozen=True)
class Shape:
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    vocab: int = 8000
    batch: int = 16
    seq: int = 64
    top_k: int = 64


QUICK = Shape(layers=2, hidden=64, heads=2, vocab=1000, batch=8, seq=32, top_k=16)


def build_step(variant: str, device: str = "cpu", **shape_fields: int) -> Callable[[], None]:
    """One training step of `variant` on fixed data; called in-process and by the memory subprocess."""
    shape = Shape(**shape_fields)
    torch.manual_seed(0)
    config = TinyModelConfig(hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads)
    student = build_tiny(config, shape.vocab, seed=0).to(device)
    student.train()
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    teacher = TopKLogits.from_logits(3.0 * torch.randn(shape.batch, shape.seq, shape.vocab), shape.top_k)
    ids, labels, teacher = ids.to(device), labels.to(device), teacher.to(device)
    jsd = get_loss("jsd")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def loss(logits: torch.Tensor, reduction: str) -> torch.Tensor:
        return jsd(logits, teacher, labels, beta=0.5, tail="uniform", reduction=reduction)

    if variant == "non_dp":

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss(student(input_ids=ids).logits, "mean").backward()
            optimizer.step()

        return step
    private = PrivateStudent(
        student,
        optimizer,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=shape.batch,
        mode="ghost" if variant == "ghost_two_pass" else variant,
        bookkeeping=variant != "ghost_two_pass",
    )

    def dp_step() -> None:
        private.optimizer.zero_grad(set_to_none=True)
        private.backward(student(input_ids=ids).logits, lambda logits: loss(logits, "none"))
        private.optimizer.step()

    return dp_step


def within_target(time_ratio: float | None) -> bool:
    return time_ratio is not None and time_ratio <= TARGET_RATIO


def time_variants(shape: Shape, rounds: int, steps: int, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Wall-clock and process CPU time per step; CPU time barely moves with other jobs' load."""
    built = {name: build_step(name, device, **asdict(shape)) for name in VARIANTS}
    if device == "cuda":  # the kernels inside the timing
        built = {name: _synchronized(step) for name, step in built.items()}
    for step in built.values():
        step()
    wall: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(rounds):
        order = VARIANTS[round_index % len(VARIANTS) :] + VARIANTS[: round_index % len(VARIANTS)]
        for name, _ in itertools.product(order, range(steps)):
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            built[name]()
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    return {
        name: {
            "wall_median_s": statistics.median(wall[name]),
            "wall_min_s": min(wall[name]),
            "cpu_median_s": statistics.median(cpu[name]),
            "cpu_min_s": min(cpu[name]),
        }
        for name in VARIANTS
    }


def _synchronized(step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        step()
        torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, prints only")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue's figures: 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else Shape()
    timing = time_variants(shape, args.rounds, args.steps, args.device)
    memory = {
        name: run_variant_in_subprocess(
            "dp_step:build_step",
            {"variant": name, **asdict(shape)},
            repeats=0,
            warmup=True,
            threads=args.threads,
            device=args.device,
        )["peak_bytes_beyond_inputs"]
        for name in VARIANTS
    }
    private = [name for name in VARIANTS if name != "non_dp"]
    ratios = {
        statistic: {name: ratio(timing[name][statistic], timing["non_dp"][statistic]) for name in private}
        for statistic in ("wall_median_s", "wall_min_s", "cpu_median_s", "cpu_min_s")
    }
    results = {
        "benchmark": "dp_step",
        "shape": asdict(shape),
        "device": args.device,
        **cuda_info(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "torch": torch.__version__,
        "opacus": __import__("opacus").__version__,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "variants": {name: {**timing[name], "peak_bytes_beyond_inputs": memory[name]} for name in VARIANTS},
        "time_ratio_vs_non_dp": ratios,
        "memory_ratio_vs_non_dp": {name: ratio(memory[name], memory["non_dp"]) for name in private},
        "target_time_ratio": TARGET_RATIO,
        "meets_target": {
            statistic: {name: within_target(r) for name, r in by_name.items()}
            for statistic, by_name in ratios.items()
        },
    }
    if args.out is not None or args.device != "cpu":
        write_results(f"dp_step_{args.device}", results, args.out)
    elif args.quick:
        print(json.dumps(results, sort_keys=True))
    else:
        write_results("dp_step" if args.threads == 2 else f"dp_step_threads{args.threads}", results)


if __name__ == "__main__":
    main()
