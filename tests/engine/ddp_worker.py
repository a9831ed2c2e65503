"""The training runs of tests/engine/test_distributed.py, shared by the one-process reference (run in the test
process) and the data-parallel runs (one real process per rank, torch.multiprocessing spawn, gloo).

Every run builds the same tiny student, teacher and examples from fixed seeds, trains, and writes what
the test compares (per-step losses, a digest and the values of the final parameters, what rank > 0
wrote) to `<report>/rank-<r>.json`. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import torch

N_EXAMPLES, VOCAB = 11, 64  # batch 5 over 11 examples: global batches of 5, 5 and 1 per epoch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def examples(n: int = N_EXAMPLES):
    """Sequences of 3..12 tokens; even rows train only their second half (prompt masked)."""
    from secure_kd.data import TokenizedExample

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 13, (1,), generator=g))
        ids = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        labels = [-100 if (i % 2 == 0 and t < length // 2) else tok for t, tok in enumerate(ids)]
        out.append(TokenizedExample(input_ids=ids, labels=labels, record_index=i))
    return out


def tiny(seed: int, hidden: int = 32, tie: bool = True):
    from secure_kd.config import TinyModelConfig
    from secure_kd.models import build_tiny

    model = build_tiny(TinyModelConfig(hidden_size=hidden, num_layers=1, num_heads=2), VOCAB, seed=seed)
    if not tie:
        from secure_kd.dp.engine import untie_embeddings

        untie_embeddings(model)
    return model


def build(
    spec: dict[str, Any], out: Path, ledger_dir: Path | None = None, device: torch.device | None = None
):
    """The Distiller or DPDistiller of one scenario (`spec`: kd, train, privacy, untied, secret, device)."""
    from secure_kd.config import KDConfig, TrainConfig
    from secure_kd.teacher_targets import LiveTeacher

    device = device if device is not None else torch.device(spec.get("device", "cpu"))
    teacher = tiny(seed=1, hidden=48).eval().to(device)
    student = tiny(seed=2, tie=not spec.get("untied", False)).to(device)
    kd = KDConfig(**spec.get("kd", {}))
    privacy = spec.get("privacy")
    train_args = dict(spec.get("train", {}))
    if privacy is not None:
        from secure_kd.dp.config import PrivacyConfig

        train_args["privacy"] = PrivacyConfig(**privacy, ledger_dir=str(ledger_dir))
    common = dict(
        student=student,
        teacher=teacher,
        targets=LiveTeacher(teacher, kd.top_k) if kd.kd_weight > 0 else None,
        examples=examples(),
        kd=kd,
        train=TrainConfig(**train_args),
        out=out,
        pad_id=0,
        eos_id=None,
        seed=3,
        device=device,
        progress=False,
        run_hash="ddp-test",
    )
    if privacy is None:
        from secure_kd.trainer import Distiller

        return Distiller(**common)
    from secure_kd.dp.trainer import DPDistiller

    return DPDistiller(dataset_key="ddp-test-records", log=lambda m: None, **common)


@contextlib.contextmanager
def fixed_secret(secret: int | None):
    """A fresh DP run draws `secret` instead of an OS secret (so that two runs can be compared); a
    secret read back from a checkpoint is kept. Undone on exit."""
    from secure_kd.dp import trainer as dp_trainer

    original = dp_trainer.SecretRandomness
    if secret is None:
        yield
        return

    class Fixed(original):
        def __init__(self, value: int | None = None) -> None:
            super().__init__(secret if value is None else value)

    dp_trainer.SecretRandomness = Fixed
    try:
        yield
    finally:
        dp_trainer.SecretRandomness = original


def run(
    spec: dict[str, Any],
    out: Path,
    report: Path,
    rank: int = 0,
    ledger_dir: Path | None = None,
    device: torch.device | None = None,
) -> dict:
    """Train the scenario (resuming when spec['resume']); write and return what the test compares."""
    distiller = build(spec, out, ledger_dir, device)
    stop_at = spec.get("interrupt_at")
    if stop_at is not None:

        def interrupt(step: int, loss: float) -> None:
            if step == stop_at:
                raise KeyboardInterrupt

        distiller.on_step = interrupt
    interrupted = False
    try:
        with fixed_secret(spec.get("secret")):
            fit = distiller.fit(resume=spec.get("resume", False))
        losses = fit.losses
    except Exception as exc:  # TrainingInterrupted
        if type(exc).__name__ != "TrainingInterrupted":
            raise
        interrupted, losses = True, None
    params = {n: p.detach().double().cpu() for n, p in distiller.student.named_parameters()}
    result = {
        "rank": rank,
        "losses": losses,
        "interrupted": interrupted,
        "params": {n: p.flatten().tolist() for n, p in params.items()},
        "total_steps": distiller.total_steps,
        "noise_multiplier": getattr(distiller, "noise_multiplier", None),
    }
    report.mkdir(parents=True, exist_ok=True)
    (report / f"rank-{rank}.json").write_text(json.dumps(result))
    return result


def spawned(
    rank: int, world: int, port: int, scenarios: list[dict], report: str, device: str = "cpu"
) -> None:
    """One rank: the launcher's environment, the process group, each scenario in turn, the teardown.

    A scenario: {"name", "spec", "out", "ledgers"}; `out` and `ledgers` may hold `{rank}`, giving each
    rank its own directory, so that what a rank > 0 writes (nothing, if all is well) is visible."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from secure_kd import distributed

    try:
        _, rank_device = distributed.init_from_environment(device)
        for scenario in scenarios:
            out = Path(scenario["out"].format(rank=rank))
            ledgers = Path(scenario.get("ledgers", str(out) + "-ledgers").format(rank=rank))
            with counted_reservations() as reservations:
                result = run(
                    scenario["spec"], out, Path(report) / scenario["name"], rank, ledgers, rank_device
                )
            result["reservations"] = reservations[0]
            (Path(report) / scenario["name"] / f"rank-{rank}.json").write_text(json.dumps(result))
    except BaseException:
        Path(report).mkdir(parents=True, exist_ok=True)
        (Path(report) / f"rank-{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        distributed.shutdown()


class counted_reservations:
    """Count this process's calls of Ledger.reserve (each a lock, a read and maybe a write of the ledger)."""

    def __enter__(self) -> list[int]:
        from secure_kd.dp.ledger import Ledger

        self.count, self.original = [0], Ledger.reserve
        count = self.count

        def reserve(ledger, *args, **kwargs):
            count[0] += 1
            return self.original(ledger, *args, **kwargs)

        Ledger.reserve = reserve
        return self.count

    def __exit__(self, *exc) -> None:
        from secure_kd.dp.ledger import Ledger

        Ledger.reserve = self.original


def run_ranks(
    scenarios: list[dict], report: Path, world: int = 2, device: str = "cpu"
) -> dict[str, list[dict]]:
    """The scenarios on `world` real processes: {name: each rank's report} (raises with their tracebacks)."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(spawned, args=(world, free_port(), scenarios, str(report), device), nprocs=world, join=True)
    except Exception as exc:
        errors = "\n".join(p.read_text() for p in sorted(report.glob("rank-*.error")))
        raise AssertionError(f"a rank failed: {exc}\n{errors}") from None
    return {
        s["name"]: [json.loads((report / s["name"] / f"rank-{r}.json").read_text()) for r in range(world)]
        for s in scenarios
    }
