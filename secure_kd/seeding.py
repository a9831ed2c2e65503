"""Seeded model construction that leaves the caller's RNG alone and is safe across threads.

Model constructors (transformers, peft, torch.nn) draw their initial weights from torch's
process-wide RNG. `fork_rng` saves and restores that state around a seeded construction, but two
threads doing so at once interleave (one thread's `manual_seed` is overwritten by the other's), so
"seeded" models would differ run to run; in-process simulations build clients in threads. The lock
makes each seeded construction atomic within the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_LOCK = threading.RLock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside: torch's CPU RNG starts from `seed`; after: the caller's state is back."""
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
