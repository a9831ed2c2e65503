"""Data-parallel training on 2 real processes (torch.multiprocessing spawn, gloo, CPU) against 1 process.

The reference is the one-process run of the same scenario (the path every other test covers); the
two-process runs must reproduce its loss at every step within 1e-4 relative and its final weights.
The scenarios are chosen so that a wrong weighting or sharding shows: a global batch of 5 over 11
sequences of 3..12 tokens with half of them prompt-masked (the two ranks' token counts differ in every
micro-batch), batches of 1 at each epoch's end (rank 0's slice is empty), gradient accumulation 2.
One spawn runs every scenario in the same two processes (a process start costs more than a run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

from secure_kd.distributed import Distributed, DistributedSetupError, from_environment  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
REL = 1e-4

PLAIN = {
    "kd": {"loss": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.5, "top_k": None},
    "train": {
        "max_steps": 4,
        "batch_size": 5,
        "grad_accum": 2,
        "lr": 1e-2,
        "checkpoint_every": 2,
        "precision": "fp32",
        "max_grad_norm": 1.0,
    },
}
FUSED = {
    "kd": {
        "loss": "jsd",
        "params": {"beta": 0.5},
        "kd_weight": 1.0,
        "ce_weight": 0.5,
        "top_k": 8,
        "fused": True,
    },
    "train": {**PLAIN["train"], "grad_accum": 1, "checkpoint_every": 50},
    "untied": True,
}
DP = {
    "kd": {"loss": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.5, "top_k": None},
    "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "precision": "fp32"},
    "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 0.5, "max_physical_batch_size": 2},
    # this secret's Poisson samples have 7, 5, 4 and 1 records: rank 0's slice of the last is empty (a
    # noise-only share), and the ranks' numbers of physical batches differ
    "secret": 6,
}
DP_GHOST = {
    **DP,
    "untied": True,
    "privacy": {**DP["privacy"], "grad_sample_mode": "ghost"},
}


def scenarios(root: Path) -> list[dict]:
    return [
        {"name": "plain", "spec": PLAIN, "out": str(root / "plain-{rank}")},
        {"name": "fused", "spec": FUSED, "out": str(root / "fused-{rank}")},
        {"name": "interrupted", "spec": {**PLAIN, "interrupt_at": 2}, "out": str(root / "resumed")},
        {"name": "resumed", "spec": {**PLAIN, "resume": True}, "out": str(root / "resumed")},
        {"name": "dp", "spec": DP, "out": str(root / "dp-{rank}"), "ledgers": str(root / "ledgers-{rank}")},
        {
            "name": "dp_interrupted",
            "spec": {**DP, "interrupt_at": 2},
            "out": str(root / "dp-resumed"),
            "ledgers": str(root / "dp-resumed-ledgers"),
        },
        {
            "name": "dp_resumed",
            "spec": {**DP, "resume": True, "secret": None},  # the secret comes from the checkpoint
            "out": str(root / "dp-resumed"),
            "ledgers": str(root / "dp-resumed-ledgers"),
        },
        {
            "name": "dp_ghost",
            "spec": DP_GHOST,
            "out": str(root / "ghost-{rank}"),
            "ledgers": str(root / "ghost-ledgers-{rank}"),
        },
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (one-process report, [rank 0 report, rank 1 report])} and the directory of the runs."""
    root = tmp_path_factory.mktemp("ddp")
    two = ddp_worker.run_ranks(scenarios(root / "two"), root / "reports")
    one = {}
    for name, spec in [("plain", PLAIN), ("fused", FUSED), ("dp", DP), ("dp_ghost", DP_GHOST)]:
        with ddp_worker.counted_reservations() as reservations:
            one[name] = ddp_worker.run(
                spec, root / "one" / name, root / "one-reports" / name, 0, root / "one" / f"{name}-ledgers"
            )
        one[name]["reservations"] = reservations[0]
    return {name: (one.get(name), two[name]) for name in two}, root


def max_relative_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def max_param_difference(a: dict, b: dict) -> float:
    return max(float((torch.tensor(a[n]) - torch.tensor(b[n])).abs().max()) for n in a)


def assert_same_run(one: dict, ranks: list[dict], *, params_atol: float) -> float:
    """Every rank reports the one-process loss curve and weights; returns the max relative loss difference."""
    worst = 0.0
    for rank in ranks:
        worst = max(worst, max_relative_difference(one["losses"], rank["losses"]))
        assert max_param_difference(one["params"], rank["params"]) < params_atol
    assert worst < REL, f"2 processes vs 1: max relative loss difference {worst:.3g}"
    assert max_param_difference(ranks[0]["params"], ranks[1]["params"]) == 0.0  # one model, not two
    return worst


def test_the_scenario_makes_a_wrong_weighting_visible():
    """Precondition of the equality tests: the ranks' slices hold different numbers of trained tokens in
    every micro-batch of the run, and some slice is empty (a global batch of 1 on 2 ranks)."""
    from secure_kd.data import collate, epoch_order
    from secure_kd.teacher_targets import shift_labels

    examples = ddp_worker.examples()
    batch = PLAIN["train"]["batch_size"]
    per_epoch = -(-len(examples) // batch)
    counts, empty = [], 0
    for index in range(PLAIN["train"]["max_steps"] * PLAIN["train"]["grad_accum"]):
        epoch, position = divmod(index, per_epoch)
        ids = epoch_order(len(examples), epoch, 3)[position * batch : (position + 1) * batch]
        tokens = []
        for rank in range(2):
            shard = Distributed(rank, 2).shard(ids)
            empty += not shard
            labels = collate([examples[i] for i in shard], pad_id=0)["labels"] if shard else None
            tokens.append(0 if labels is None else int((shift_labels(labels) != -100).sum()))
        counts.append(tokens)
    assert all(a != b for a, b in counts), counts
    assert empty >= 1


def test_two_processes_give_the_one_process_loss_curve(runs):
    """DDP with grad accumulation: the global batch's token-mean loss and the weights equal 1 process's."""
    one, ranks = runs[0]["plain"]
    worst = assert_same_run(one, ranks, params_atol=1e-4)
    print(f"plain DDP, 2 ranks vs 1: max relative loss difference {worst:.3g}")


def test_fused_loss_through_ddp_gives_the_one_process_loss_curve(runs):
    """kd.fused: DDP wraps a forward that returns hidden states; the output layer's gradient, taken
    outside that forward, is still averaged over the ranks (untied weights, so it is a separate one)."""
    one, ranks = runs[0]["fused"]
    worst = assert_same_run(one, ranks, params_atol=1e-4)
    print(f"fused DDP, 2 ranks vs 1: max relative loss difference {worst:.3g}")


def test_only_rank_zero_writes_checkpoints(runs):
    results, root = runs
    assert (root / "two" / "plain-0" / "checkpoints" / "step-000004" / "student.safetensors").is_file()
    assert sorted(p.name for p in (root / "two" / "plain-0" / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]
    assert not (root / "two" / "plain-1").exists()  # rank 1 had its own out directory and wrote nothing


def test_a_multi_process_run_resumes_where_it_stopped(runs):
    """Two processes stopped (Ctrl-C) after step 2, then two new runs resumed: the whole loss curve and the
    weights are those of the uninterrupted one-process run."""
    results, root = runs
    interrupted, resumed = results["interrupted"][1], results["resumed"][1]
    assert all(r["interrupted"] for r in interrupted)
    one = results["plain"][0]
    assert_same_run(one, resumed, params_atol=1e-4)
    assert sorted(p.name for p in (root / "two" / "resumed" / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]


def read_privacy(path: Path) -> dict:
    return json.loads((path / "privacy.json").read_text())


@pytest.mark.parametrize("name", ["dp", "dp_ghost"])
def test_dp_sgd_on_two_processes_is_the_one_process_run(runs, name):
    """Same secret, same Poisson sample of the whole dataset split across the ranks, each rank clips its own
    examples, the noise (std 0.5 per coordinate before the division by the batch) is added once: the noisy
    updates, the losses and epsilon equal the one-process run's. Noise added on both ranks, or ranks that
    sampled on their own, would not reproduce the weights."""
    results, root = runs
    one, ranks = results[name]
    worst = assert_same_run(one, ranks, params_atol=1e-6)
    print(f"{name}, 2 ranks vs 1: max relative loss difference {worst:.3g}")
    prefix = "dp" if name == "dp" else "ghost"
    two_report = read_privacy(root / "two" / f"{prefix}-0")
    one_report = read_privacy(root / "one" / name)
    assert two_report["epsilon"] == one_report["epsilon"] and two_report["steps"] == 4
    assert two_report["sample_rate"] == one_report["sample_rate"] == 4 / ddp_worker.N_EXAMPLES
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(4):
        accountant.step(noise_multiplier=1.0, sample_rate=4 / ddp_worker.N_EXAMPLES)
    assert two_report["epsilons"]["rdp"] == pytest.approx(
        accountant.get_epsilon(two_report["delta"]), rel=1e-9
    )


def test_dp_ledger_is_reserved_once_per_step_by_rank_zero(runs):
    results, root = runs
    one, (rank0, rank1) = results["dp"]
    assert one["reservations"] == rank0["reservations"] == 4 and rank1["reservations"] == 0
    ledger = root / "two" / "ledgers-0"
    (entry_line,) = [
        json.loads(line)
        for line in (next(ledger.glob("*.jsonl"))).read_text().splitlines()
        if '"entry"' in line
    ]
    assert entry_line["entry"]["steps"] == 4
    assert not (root / "two" / "ledgers-1").exists() and not (root / "two" / "dp-1").exists()


def test_a_dp_run_on_two_processes_resumes_with_one_ledger_entry(runs):
    """DP-SGD stopped after step 2 of 4 on 2 processes and resumed on 2: the one-process weights and epsilon,
    and the ledger holds one entry of 4 steps (the resumed run continued it; no rank opened another)."""
    results, root = runs
    assert all(r["interrupted"] for r in results["dp_interrupted"][1])
    one = results["dp"][0]
    assert_same_run(one, results["dp_resumed"][1], params_atol=1e-6)
    assert [r["reservations"] for r in results["dp_resumed"][1]] == [2, 0]  # steps 3 and 4, by rank 0
    (ledger,) = (root / "two" / "dp-resumed-ledgers").glob("*.jsonl")
    entries = [json.loads(line)["entry"] for line in ledger.read_text().splitlines() if '"entry"' in line]
    assert len(entries) == 1 and entries[0]["steps"] == 4
    assert (
        read_privacy(root / "two" / "dp-resumed")["epsilon"] == read_privacy(root / "one" / "dp")["epsilon"]
    )


def test_the_noise_is_material_to_the_dp_comparison(tmp_path, runs):
    """Another secret (other sample and noise) gives other weights: the DP equality above is not vacuous."""
    other = ddp_worker.run(
        {**DP, "secret": 999}, tmp_path / "out", tmp_path / "report", 0, tmp_path / "ledgers"
    )
    assert max_param_difference(other["params"], runs[0]["dp"][0]["params"]) > 1e-3


# -- the launchers' environment ----------------------------------------------------------------------------
def test_launch_environment_is_read_and_checked():
    assert from_environment({}) == from_environment({"WORLD_SIZE": "1"})
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    launch = from_environment(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_port) == (1, 2, 1, 29500)
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR and MASTER_PORT are not set"):
        from_environment({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedSetupError, match=r"RANK=2 is outside 0..1"):
        from_environment({**env, "RANK": "2"})
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE='two' is not an integer"):
        from_environment({**env, "WORLD_SIZE": "two"})


def test_shards_partition_the_global_batch_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            items = list(range(100, 100 + n))
            shards = [Distributed(r, world).shard(items) for r in range(world)]
            assert [x for s in shards for x in s] == items
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_one_gpu_per_process_is_checked():
    from secure_kd.distributed import process_device

    assert process_device(torch.device("cpu"), 3, 4) == torch.device("cpu")
    if torch.cuda.device_count() < 8:
        with pytest.raises(DistributedSetupError, match="LOCAL_RANK=7 needs its own GPU"):
            process_device(torch.device("cuda"), 7, 8)


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    from typer.testing import CliRunner

    from secure_kd.app.cli import app

    result = CliRunner().invoke(
        app,
        [
            "distill",
            "--config",
            str(REPO / "configs/tiny.yaml"),
            "--out",
            str(tmp_path),
            "--set",
            "device=cuda",
        ],
    )
    assert result.exit_code == 2
    assert "device: cuda was asked for but no CUDA device is visible" in result.output
    assert "Traceback" not in result.output


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SECURE_KD_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def test_accelerate_launch_sets_what_secure_kd_reads(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (it starts processes the same way on a CPU-only
    machine): each process finds its rank, the world size and the rendezvous in the environment."""
    if not (VENV_BIN / "accelerate").exists():
        pytest.skip("accelerate is not installed")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json\nfrom secure_kd.distributed import from_environment\n"
        "e = from_environment()\n"
        "print(json.dumps([e.rank, e.world_size, e.local_rank, bool(e.master_addr)]))\n"
    )
    args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    args += ["--dynamo_backend", "no", "--main_process_port", str(ddp_worker.free_port())]
    proc = subprocess.run(
        [str(VENV_BIN / "accelerate"), "launch", *args, str(probe)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**child_env(), "HOME": str(tmp_path)},  # no accelerate config file of the user's
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = sorted(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("["))
    assert seen == [[0, 2, 0, True], [1, 2, 1, True]]


def test_torchrun_secure_kd_distill_gives_the_one_process_run(tmp_path):
    """The issue's command, `torchrun --nproc_per_node=2 $(which secure-kd) distill ...`, with the tiny
    config (teacher top-k cache built by rank 0, read by rank 1): results.json has the one-process loss
    curve and training tokens; the cache, checkpoints and student were written."""
    from secure_kd.config import load_config
    from secure_kd.distill_job import run_distill

    overrides = ["train.max_steps=3", "train.checkpoint_every=2", "device=cpu"]
    one = run_distill(
        load_config(REPO / "configs/tiny.yaml", [*overrides, f"out={tmp_path / 'one'}"]),
        progress=False,
        log=lambda *a, **k: None,
    )
    out = tmp_path / "two"
    command = [str(VENV_BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={ddp_worker.free_port()}"]
    command += [str(VENV_BIN / "secure-kd"), "distill", "--config", str(REPO / "configs/tiny.yaml")]
    command += ["--out", str(out), "--no-progress", *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((out / "results.json").read_text())
    assert max_relative_difference(one.losses, two["losses"]) < REL
    assert two["train_tokens"] == one.train_tokens and two["steps"] == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert (out / "student" / "model.safetensors").is_file() and (
        out / "teacher-cache" / "manifest.json"
    ).is_file()
