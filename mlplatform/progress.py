"""What a person sees on the terminal: one line per training epoch, Tune trial report and
pipeline step, written by the driver to stderr (stdout keeps the mode's JSON summary).

Ray's own progress output (Ray Train's per-report log lines, Ray Data's execution logs and
progress bars, Tune's status tables) stays in Ray's log files at the default level.
`MLP_LOG_LEVEL=debug` (or `hydra.verbose=true`) puts it back on the terminal.

No Ray import here: run.py calls `configure` before a config error could need one.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

ENV = "MLP_LOG_LEVEL"
# Ray processes started from this one inherit it; a value the user exported wins. Ray Data
# logs its execution plans and, where no terminal draws its bars, its progress at INFO.
QUIET_RAY_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING"}
EPOCH_METRICS = ("train/loss", "val/loss", "val/acc")


def verbose() -> bool:
    return os.environ.get(ENV, "").strip().lower() == "debug"


def configure(debug: bool = False) -> None:
    """Before Ray starts. `debug` (hydra.verbose) counts like MLP_LOG_LEVEL=debug."""
    if debug:
        os.environ[ENV] = "debug"
    if verbose():
        logging.getLogger("mlplatform").setLevel(logging.DEBUG)
        return
    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)


def quiet_ray_worker() -> None:
    """In a Ray Train worker: Ray Train logs each report ("Reporting training result N: ...")
    through a logger named after its source file, which RunConfig's LoggingConfig does not
    reach; it propagates to the root logger, which Ray Train sets to INFO."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("mlplatform").setLevel(logging.INFO)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """4.2 s, 15 s, 2 min 5 s, 1 h 3 min."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        m, s = divmod(round(seconds), 60)
        return f"{m} min {s} s" if s else f"{m} min"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m} min" if m else f"{h} h"


def metrics_text(metrics: dict[str, Any], keys: tuple[str, ...] = EPOCH_METRICS) -> str:
    return "  ".join(f"{k} {metrics[k]:.2f}" for k in keys if isinstance(metrics.get(k), int | float))


class EpochClock:
    """Seconds per epoch and time left, from when reports reach the driver.

    The first epoch's time is the worker's own measure (the driver's clock would include the
    worker group's start-up); later ones are the driver's time between reports, which counts
    checkpointing too. A report for an epoch already seen means the run resumed from a
    checkpoint: the clock starts again.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.first: tuple[int, float] | None = None
        self.last_epoch = -1
        self.first_epoch_seconds: float | None = None

    def line(self, metrics: dict[str, Any], prefix: str = "", now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        epoch = int(metrics.get("epoch", self.last_epoch + 1))
        resumed = epoch <= self.last_epoch
        if resumed or self.first is None:
            self.first = (epoch, now)
            self.first_epoch_seconds = metrics.get("epoch_seconds")
        self.last_epoch = epoch
        first_epoch, first_time = self.first
        per_epoch = ((now - first_time) / (epoch - first_epoch) if epoch > first_epoch
                     else self.first_epoch_seconds)
        parts = [f"{prefix}epoch {epoch + 1}/{self.total}", metrics_text(metrics)]
        if per_epoch:
            parts.append(f"{duration(per_epoch)}/epoch")
            if epoch + 1 < self.total:
                parts.append(f"ETA {duration(per_epoch * (self.total - epoch - 1))}")
        if resumed:
            parts.append("(resumed from a checkpoint)")
        return "  ".join(p for p in parts if p)


class Steps:
    """Pipeline steps: a line when one starts running and when it ends, or that it was cached."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.width = max((len(n) for n in self.names), default=0)

    def _head(self, name: str) -> str:
        return f"step {self.names.index(name) + 1}/{len(self.names)}  {name:<{self.width}}"

    def started(self, name: str) -> None:
        say(f"{self._head(name)}  running")

    def finished(self, name: str, status: str, seconds: float) -> None:
        say(f"{self._head(name)}  {'done' if status == 'ran' else status}  {duration(seconds)}")
