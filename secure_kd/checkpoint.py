"""Training checkpoints that resume exactly: weights (safetensors), optimizer, scheduler, RNG.

Layout: `<out>/checkpoints/step-000050/{student.safetensors, state.pt, trainer.json}`. The
`state.pt` holds only tensors and plain Python values and is read with
`torch.load(weights_only=True)`. A checkpoint directory is written under a temporary name and
renamed when complete, so a kill mid-save leaves the previous checkpoint intact.

Data-parallel runs (`secure_kd.distributed`): only rank 0 writes (`save_checkpoint` on another rank
writes nothing and returns the path rank 0 writes), and on resume rank 0 picks the checkpoint and
every rank loads that same one, so `out` must be on a filesystem every process sees (one machine,
or a shared mount across nodes); a rank that cannot see it stops with a message saying so.

Checkpoints are as private as the training data (weights trained on it; under DP, `state.pt` holds
the run's secret sampling and noise seed): `checkpoints/` and every `step-*` directory are 0700,
every file 0600, also when the directory existed before with looser modes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from secure_kd.distributed import Distributed
from secure_kd.distributed import current as current_distributed
from secure_kd.paths import PRIVATE_FILE_MODE, atomic_write_json, chmod_private_tree, private_dir

KEEP_LAST = 2


class ResumeError(ValueError):
    """A checkpoint cannot be resumed with this configuration."""


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: Path, *, distributed: Distributed | None = None) -> Path | None:
    """The newest complete checkpoint in `out`, or None; under data parallelism, rank 0's choice."""
    dist = distributed if distributed is not None else current_distributed()
    found = _latest_on_disk(out) if dist.is_main else None
    if not dist.enabled:
        return found
    name = dist.broadcast_str(found.name if found is not None else None)
    if name is None:
        return None
    path = checkpoint_root(out) / name
    if not (path / "trainer.json").is_file():
        raise ResumeError(
            f"rank {dist.rank} cannot see checkpoint {path}, which rank 0 resumes from: every process must "
            "see the same --out directory (run on one machine, or put --out on a filesystem all nodes mount)"
        )
    return path


def _latest_on_disk(out: Path) -> Path | None:
    root = checkpoint_root(out)
    done = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(
    out: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config_hash: str,
    extra: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write `<out>/checkpoints/step-N` (temp dir, then rename; the last KEEP_LAST are kept); its path.

    Under data parallelism only rank 0 writes; other ranks return the path rank 0 writes."""
    if not current_distributed().is_main:
        return checkpoint_root(out) / f"step-{step:06d}"
    root = private_dir(checkpoint_root(out))
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    save_model(model, str(tmp / "student.safetensors"))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": extra_state or {},
    }
    fd = os.open(tmp / "state.pt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        torch.save(state, handle)
    meta = {"step": step, "config_hash": config_hash, **(extra or {})}
    atomic_write_json(tmp / "trainer.json", meta, mode=PRIVATE_FILE_MODE)
    chmod_private_tree(tmp)  # the umask, not us, decided the weights file's mode
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step-*"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    chmod_private_tree(root)  # checkpoints an earlier version left readable by others
    return final


def load_checkpoint(
    path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config_hash: str
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Restore in place; returns (step, trainer.json contents, extra_state)."""
    meta = json.loads((path / "trainer.json").read_text())
    if meta["config_hash"] != config_hash:
        raise ResumeError(
            f"checkpoint {path} was written with a different configuration (hash {meta['config_hash'][:12]} "
            f"vs {config_hash[:12]}); resume with the same config, or start over in a new --out directory"
        )
    load_model(model, str(path / "student.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(meta["step"]), meta, state.get("extra", {})
