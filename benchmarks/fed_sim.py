"""Round time of `secure-kd federate` in Flower's simulation engine vs the same local work alone.

For N in --clients (default 2 4 8 16): a plaintext fedavg job with N organizations, a tiny student
(hidden 16, 1 layer, vocabulary 320), a fixed local workload per organization and round
(--local-steps DP-free steps of batch 8, plus the evaluation every client does), --rounds rounds.

* `round_seconds`: wall time of a round measured by the ServerApp (sending, client work in up to
  --workers ClientApps at once, validation, aggregation), rounds 2.. only: round 1 also pays for
  starting the ClientApp processes (imports), reported apart as `first_round_seconds`;
* `local_seconds`: the same per-organization work (load the student, install the global weights,
  evaluate, train the same steps, save, read back the update) with the same engine calls and no
  Flower, in --workers plain processes started together (one torch thread each, like the ClientApp
  processes), each taking its share of the organizations: the round without any federation;
* `overhead = round_seconds / local_seconds - 1`; `outside_rounds_seconds`: the rest of the run (Ray and
  ClientApp start-up, the first contact with every organization, the final evaluation), once per run.
* `client_handler_seconds_per_round`: the time spent inside the ClientApp calls of a round (reported by
  the clients), divided by --workers; `round_seconds` minus it is what Flower's engine itself costs
  (Ray task dispatch, message (de)serialization, polling); `engine_overhead` is that cost relative to the
  time inside the ClientApps.
* `heavier_workload`: the largest client count again with --heavy-steps local steps, to separate the
  federation's fixed cost per client and round from the work it carries.

`--large N` then runs the largest simulation (N organizations, --large-rounds rounds, 5 local steps)
and reports whether and in how long it finishes.

Run: `python benchmarks/fed_sim.py` (about 10 minutes on 2 cores); prints one JSON line and writes
benchmarks/results/fed_sim.json. Timings depend on the load of the machine: compare figures of one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from federation.client.training import evaluate, train_locally
from federation.client.workspace import OrgWorkspace
from federation.config import FederatedJob
from federation.job_data import job_data
from federation.run import run_federation
from federation.students import flat_parameters, load_parameters


def make_job(n: int, out: Path, *, local_steps: int, rounds: int, workers: int) -> FederatedJob:
    return FederatedJob.model_validate(
        dict(
            seed=0,
            out=str(out),
            n_organizations=n,
            rounds=rounds,
            mode="fedavg",
            protection="plaintext",
            tokenizer="tiny:320",
            round_timeout_s=3600,
            join_timeout_s=600,
            simultaneous_clients=workers,
            student={"source": "tiny", "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}},
            data={
                "synthetic": {"n_records": max(120, 12 * n), "n_canaries": 0},
                "heldout_fraction": 0.05,
                "max_length": 32,
            },
            partition={"kind": "iid", "min_records": 6},
            kd={"loss": "forward_kl"},
            train={
                "max_steps": local_steps,
                "batch_size": 8,
                "lr": 3e-3,
                "schedule": "constant",
                "eval_batches": 1,
            },
            transfer={"n_records": 8},
        )
    )


def _client_work(ws: OrgWorkspace) -> None:
    """What a ClientApp does in a fedavg round, minus Flower: install, evaluate, train, save, export."""
    model = ws.student()
    names, tensors = flat_parameters(model)
    load_parameters(model, {n: t.float().cpu().numpy() for n, t in zip(names, tensors, strict=True)})
    evaluate(ws, model)
    train_locally(ws, model, 1)
    ws.save_student(model)
    [t.float().cpu().numpy() for t in flat_parameters(model)[1]]


def _worker(job_json: str, indices: list[int], root: str, barrier, results) -> None:
    """One plain process of the parallel baseline: warm up, wait for the others, time its share."""
    torch.set_num_threads(1)  # as each ClientApp process (Ray gives an actor with num_cpus=1 one thread)
    job = FederatedJob.model_validate_json(job_json)
    job_data(job)  # public data built once, as each ClientApp process caches it
    _client_work(OrgWorkspace(job, indices[0], Path(root) / f"warm-up-{indices[0]}"))
    barrier.wait()
    started = time.perf_counter()
    for index in indices:
        _client_work(OrgWorkspace(job, index, Path(root) / f"org-{index}"))
    results.put(time.perf_counter() - started)


def local_baseline(job: FederatedJob, root: Path, workers: int) -> float:
    """Wall seconds of one round's client work for every organization without Flower: `workers` plain
    processes, each doing its share of the organizations with the same engine calls, started together."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    processes = [
        ctx.Process(
            target=_worker,
            args=(
                job.model_dump_json(),
                list(range(k, job.n_organizations, workers)),
                str(root),
                barrier,
                results,
            ),
        )
        for k in range(workers)
    ]
    for process in processes:
        process.start()
    seconds = max(results.get() for _ in processes)
    for process in processes:
        process.join()
    return seconds


def measure(n: int, args, scratch: Path, local_steps: int) -> dict:
    job = make_job(
        n,
        scratch / f"fed-{n}-{local_steps}",
        local_steps=local_steps,
        rounds=args.rounds,
        workers=args.workers,
    )
    started = time.perf_counter()
    result = run_federation(job, progress=False)
    total = time.perf_counter() - started
    rounds = [r.seconds for r in result.rounds]
    steady = statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]
    local = local_baseline(job, scratch / f"local-{n}-{local_steps}", args.workers)
    # mean time inside one ClientApp call (steady rounds): the rest of a round is Flower's transport
    handler = statistics.mean(r.summary["handler-seconds"] for r in result.rounds[1:] or result.rounds)
    return {
        "clients": n,
        "local_steps": local_steps,
        "round_seconds": steady,
        "first_round_seconds": rounds[0],
        "rounds_seconds": rounds,
        "local_seconds": local,
        "overhead": steady / local - 1.0,
        "fixed_seconds_per_client_round": (steady - local) * args.workers / n,
        "client_handler_seconds_per_round": handler * n / args.workers,
        "engine_overhead": steady / (handler * n / args.workers) - 1.0,
        "outside_rounds_seconds": total - sum(rounds),
        "run_seconds": total,
        "answered": [len(r.answered) for r in result.rounds],
        "bytes_up_per_round": result.rounds[-1].bytes_up,
    }


def largest(n: int, args, scratch: Path) -> dict:
    job = make_job(n, scratch / f"large-{n}", local_steps=5, rounds=args.large_rounds, workers=args.workers)
    started = time.perf_counter()
    try:
        result = run_federation(job, progress=False)
        ok, error = result.completed, None
        rounds = [r.seconds for r in result.rounds]
    except Exception as exc:  # report the failure, do not hide it
        ok, error, rounds = False, f"{type(exc).__name__}: {exc}", []
    return {
        "organizations": n,
        "rounds": args.large_rounds,
        "local_steps": 5,
        "completed": ok,
        "error": error,
        "total_seconds": time.perf_counter() - started,
        "rounds_seconds": rounds,
        "under_10_minutes": ok and time.perf_counter() - started < 600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--heavy-steps", type=int, default=80, help="local steps of the heavier run (0: skip)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--large", type=int, default=100, help="organizations of the largest run (0: skip)")
    parser.add_argument("--large-rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fed_sim.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fed_sim-") as tmp:
        scratch = Path(tmp)
        by_clients = [measure(n, args, scratch, args.local_steps) for n in args.clients]
        heavy = measure(args.clients[-1], args, scratch, args.heavy_steps) if args.heavy_steps else None
        large = largest(args.large, args, scratch) if args.large else None
    report = {
        "schema_version": 1,
        "benchmark": "fed_sim",
        "config": {
            "clients": args.clients,
            "local_steps": args.local_steps,
            "rounds": args.rounds,
            "workers": args.workers,
            "student": "tiny Llama, hidden 16, 1 layer, vocab 320",
            "mode": "fedavg",
            "protection": "plaintext",
            "backend": "flwr run_simulation (ray)",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "by_clients": by_clients,
        "overhead_at_max_clients": by_clients[-1]["overhead"],
        "target_overhead_at_16": 0.20,
        "heavier_workload": heavy,
        "largest": large,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {
                "benchmark": "fed_sim",
                "overhead": {r["clients"]: round(r["overhead"], 3) for r in by_clients},
                "round_seconds": {r["clients"]: round(r["round_seconds"], 2) for r in by_clients},
                "engine_overhead": {r["clients"]: round(r["engine_overhead"], 3) for r in by_clients},
                "overhead_heavier": round(heavy["overhead"], 3) if heavy else None,
                "largest": {k: large[k] for k in ("organizations", "completed", "total_seconds")}
                if large
                else None,
            }
        )
    )


if __name__ == "__main__":
    main()
