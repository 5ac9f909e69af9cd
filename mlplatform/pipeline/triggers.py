"""The pipeline's side of the trigger directory (`mlplatform.triggers`): one run at a time,
and the triggers a finished run answered moved to `consumed/<run_id>/`."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from mlplatform.errors import JobFailed
from mlplatform.triggers import CONSUMED, LOCK, guard, pending, running


@contextlib.contextmanager
def pipeline_lock(trigger_dir: str, run_id: str) -> Iterator[None]:
    """One pipeline at a time per trigger directory; a stale lock (dead process) is taken over."""
    with guard(trigger_dir):
        holder = running(trigger_dir)
        if holder is not None and holder.get("pid") != os.getpid():
            raise JobFailed(f"another pipeline run ({holder.get('run_id')}, pid {holder.get('pid')}) is in "
                            f"progress", {"mode": "pipeline", "running": holder})
        with open(os.path.join(trigger_dir, LOCK), "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "run_id": run_id, "since": time.time()}, f)
    try:
        yield
    finally:
        with guard(trigger_dir), contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(trigger_dir, LOCK))


def consume_triggers(trigger_dir: str, run_id: str, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Move the trigger files `names` (default: every pending one) to consumed/<run_id>/;
    returns their records. Call it once the run has finished: a failed run leaves them."""
    wanted = None if names is None else set(names)
    out = []
    dest = os.path.join(trigger_dir, CONSUMED, run_id)
    for name, record in pending(trigger_dir):
        if wanted is not None and name not in wanted:
            continue
        os.makedirs(dest, exist_ok=True)
        os.replace(os.path.join(trigger_dir, name), os.path.join(dest, name))
        out.append(record)
    return out
