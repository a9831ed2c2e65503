"""Progress bars for long work (rich): step, loss, tokens/s and ETA.

Under data parallelism (`secure_kd.distributed`) only rank 0 draws bars: N processes writing to
one terminal would interleave N bars."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _is_main_process() -> bool:
    if "torch" not in sys.modules:  # no torch loaded: no process group either
        return True
    from secure_kd.distributed import current

    return current().is_main


class TrainProgress:
    def __init__(
        self, total: int, *, start: int = 0, enabled: bool = True, description: str = "distill"
    ) -> None:
        self.enabled = enabled = enabled and _is_main_process()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, loss="-", tps="-")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, completed: int, *, loss: float, tokens: int, seconds: float) -> None:
        tps = f"{tokens / seconds:,.0f}" if seconds > 0 else "-"
        self._progress.update(self._task, completed=completed, loss=f"{loss:.4f}", tps=tps)


def task_progress(description: str, total: int | None, *, enabled: bool = True) -> Progress:
    """A generic bar for batch work (teacher caching, evaluation)."""
    enabled = enabled and _is_main_process()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
    progress.add_task(description, total=total)
    return progress
