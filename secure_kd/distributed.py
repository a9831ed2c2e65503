"""Data-parallel training across processes: who am I (rank), how many are we, and who writes.

`torchrun --nproc_per_node=N` and `accelerate launch` both start N copies of the same command and
tell each its place through the environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT`. `from_environment()` reads (and checks) them; `init_from_environment(device)` starts
torch's default process group from them (`env://`, backend `nccl` on CUDA, `gloo` on CPU) and, on
CUDA, binds each process to GPU `LOCAL_RANK`. Nothing of accelerate's training loop is used: only
the variables its launcher sets. Without `WORLD_SIZE` (or with 1) everything here is a no-op and
training is single-process exactly as before.

`Distributed` is the handle the trainers use: `rank`, `world_size`, `is_main` (rank 0: the only
process that writes checkpoints, results, privacy.json, the privacy ledger and progress bars),
`shard(indices)` (rank r's contiguous slice of one global batch), and collectives over plain
numbers (`sum`, `broadcast_int`, `broadcast_float`, `broadcast_str`, `barrier`). Values cross the
process group as tensors, never pickled (`torch.distributed.broadcast_object_list` would unpickle
whatever rank 0 sent). `current()` returns the handle of the process group already started in
this process (by `init_from_environment`, or by the caller's own `init_process_group`).

See docs/distributed.md for how the global batch is split and why the per-rank loss is weighted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

ENV_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = timedelta(minutes=30)


class DistributedSetupError(ValueError):
    """The launcher's environment is inconsistent, or the devices do not fit the processes."""


@dataclass(frozen=True)
class LaunchEnvironment:
    """What the launcher (torchrun, accelerate launch) told this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(
            f"environment variable {name}={raw!r} is not an integer; it is set by the launcher "
            "(torchrun, accelerate launch): unset it to train in one process, or launch again"
        ) from None


def from_environment(env: Mapping[str, str] | None = None) -> LaunchEnvironment:
    """Read and check RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (default: os.environ)."""
    env = os.environ if env is None else env
    world_size = _int(env, "WORLD_SIZE", 1)
    if world_size < 1:
        raise DistributedSetupError(f"WORLD_SIZE={world_size} must be at least 1")
    rank = _int(env, "RANK", 0)
    local_rank = _int(env, "LOCAL_RANK", rank if world_size > 1 else 0)
    if not 0 <= rank < world_size:
        raise DistributedSetupError(
            f"RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size}); the launcher sets "
            "both: launch with torchrun or accelerate launch rather than setting them by hand"
        )
    if local_rank < 0:
        raise DistributedSetupError(f"LOCAL_RANK={local_rank} must be >= 0")
    if world_size == 1:
        return LaunchEnvironment()
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise DistributedSetupError(
            f"WORLD_SIZE={world_size} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            "set: the processes cannot find each other. Launch with `torchrun --nproc_per_node=N ...` or "
            "`accelerate launch --num_processes N ...` (they set every variable), or unset WORLD_SIZE"
        )
    port = _int(env, "MASTER_PORT", 0)
    return LaunchEnvironment(rank, world_size, local_rank, env["MASTER_ADDR"], port)


@dataclass(frozen=True)
class Distributed:
    """This process's place among the data-parallel processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ------------------------------------------------------------------------------------
    def shard_bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of rank r's contiguous slice of n items: sizes differ by at most one."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def shard(self, items: Sequence) -> list:
        """Rank r's contiguous slice of one global batch (everything when not distributed)."""
        start, stop = self.shard_bounds(len(items))
        return list(items[start:stop])

    # -- collectives over numbers -----------------------------------------------------------------
    def _device(self) -> torch.device:
        """Where collective tensors live: the current CUDA device under nccl, else the CPU."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def sum(self, values: Sequence[float] | Sequence[int], dtype: torch.dtype = torch.float64) -> list:
        """Element-wise sum over the ranks (the values themselves when not distributed)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(list(values), dtype=dtype, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast_int(self, value: int | None, src: int = 0) -> int:
        if not self.enabled:
            return int(value)
        tensor = torch.tensor(
            [int(value) if self.rank == src else 0], dtype=torch.int64, device=self._device()
        )
        dist.broadcast(tensor, src)
        return int(tensor.item())

    def broadcast_float(self, value: float | None, src: int = 0) -> float:
        if not self.enabled:
            return float(value)
        tensor = torch.tensor(
            [float(value) if self.rank == src else 0.0], dtype=torch.float64, device=self._device()
        )
        dist.broadcast(tensor, src)
        return float(tensor.item())

    def broadcast_str(self, value: str | None, src: int = 0) -> str | None:
        """A string (or None) from `src` to every rank, as UTF-8 bytes in a tensor."""
        if not self.enabled:
            return value
        data = value.encode() if self.rank == src and value is not None else b""
        length = self.broadcast_int(-1 if (self.rank == src and value is None) else len(data), src)
        if length < 0:
            return None
        if length == 0:
            return ""
        tensor = torch.zeros(length, dtype=torch.uint8, device=self._device())
        if self.rank == src:
            tensor.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(tensor, src)
        return bytes(tensor.cpu().tolist()).decode()

    def broadcast_parameters(self, module: torch.nn.Module, src: int = 0) -> None:
        """Every rank gets rank `src`'s parameters and buffers (what DDP does when it wraps a model)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. builds a cache), the others after it finished (and reuse it)."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()


SINGLE = Distributed()


class _TrainedForward(nn.Module):
    """What DDP wraps: the trained modules together, and the one forward pass the loss needs.

    `hidden_only` returns the final hidden states (the fused loss multiplies them by the output
    layer's weight itself, outside this forward; DDP still reduces that weight's gradient, since its
    hooks sit on every parameter's gradient accumulation, wherever the parameter is used)."""

    def __init__(self, student: nn.Module, extra: nn.Module | None, hidden_states: Callable) -> None:
        super().__init__()
        self.student = student
        self.extra = extra
        self._hidden_states = hidden_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_only: bool = False):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if hidden_only:
            return self._hidden_states(self.student, batch)
        return self.student(**batch).logits


def data_parallel(
    student: nn.Module, extra: nn.Module | None, hidden_states: Callable, device: torch.device
) -> nn.Module:
    """`student` (and an objective with parameters of its own) under torch's DistributedDataParallel.

    Call the result as `module(input_ids, attention_mask, hidden_only=False)`: logits, or the final
    hidden states with `hidden_only=True`. Construction broadcasts rank 0's parameters to every rank.
    Gradients are averaged over the ranks in backward (`module.no_sync()` skips it for accumulation)."""
    from torch.nn.parallel import DistributedDataParallel

    wrapped = _TrainedForward(student, extra, hidden_states)
    ids = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None
    )
    return DistributedDataParallel(wrapped, device_ids=ids)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on `device`; to CUDA from pinned memory without blocking (the copy overlaps
    the host's work; later kernels on the stream wait for it), elsewhere a plain `.to`."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def current() -> Distributed:
    """The handle of the process group started in this process, or rank 0 of 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local_rank = _int(os.environ, "LOCAL_RANK", dist.get_rank())
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


def process_device(device: torch.device, local_rank: int, world_size: int) -> torch.device:
    """The device of this process: on CUDA, GPU `local_rank` (bound as the current device); else `device`."""
    if device.type != "cuda" or world_size == 1:
        return device
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise DistributedSetupError(
            f"process LOCAL_RANK={local_rank} needs its own GPU but only {visible} CUDA device(s) are "
            "visible: start at most one process per GPU (torchrun --nproc_per_node), or train on device: cpu"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_from_environment(
    device: torch.device | str = "cpu",
    *,
    env: Mapping[str, str] | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> tuple[Distributed, torch.device]:
    """Start the default process group from the launcher's variables; (handle, this process's device).

    Without a launcher (no WORLD_SIZE, or 1) nothing is started and the device is returned as given.
    A process group already started (by the caller) is reused, not started twice."""
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        handle = current()
        return handle, process_device(device, handle.local_rank, handle.world_size)
    launch = from_environment(env)
    if launch.world_size == 1:
        return SINGLE, device
    if not dist.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed: train in one process")
    device = process_device(device, launch.local_rank, launch.world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    return Distributed(launch.rank, launch.world_size, launch.local_rank), device


def shutdown() -> None:
    """Destroy the default process group if one was started (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def launched(device: torch.device | str = "cpu") -> Iterator[tuple[Distributed, torch.device]]:
    """`init_from_environment` for one job; the process group it started is destroyed at the end."""
    started_here = not (dist.is_available() and dist.is_initialized())
    handle, resolved = init_from_environment(device)
    try:
        yield handle, resolved
    finally:
        if started_here and handle.enabled:
            shutdown()


__all__ = [
    "DistributedSetupError",
    "Distributed",
    "LaunchEnvironment",
    "SINGLE",
    "current",
    "data_parallel",
    "from_environment",
    "init_from_environment",
    "launched",
    "process_device",
    "shutdown",
    "to_device",
]
