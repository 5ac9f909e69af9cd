"""Pipeline triggers: manual, scheduled (cron), and alerts from monitoring.

An alert with `monitor.alerts.action=retrain` writes a trigger file and asks for a run.
`start_guarded` makes one alert storm start one pipeline run: under an exclusive file
lock it starts nothing while a run holds the pipeline lock or within `cooldown_s` of the
last start. The run consumes every trigger file present when it starts (they go to
`consumed/` and into its lineage), so the triggers of a storm are answered together.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

LOCK = "pipeline.lock"
LAST_START = "last_start.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(trigger_dir: str) -> dict[str, Any] | None:
    """The run holding the pipeline lock, if its process is alive."""
    path = os.path.join(trigger_dir, LOCK)
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if _pid_alive(int(holder.get("pid", -1))) else None


@contextlib.contextmanager
def _guard(trigger_dir: str) -> Iterator[None]:
    os.makedirs(trigger_dir, exist_ok=True)
    with open(os.path.join(trigger_dir, ".guard"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def pipeline_lock(trigger_dir: str, run_id: str) -> Iterator[None]:
    """One pipeline at a time per trigger directory; a stale lock (dead process) is taken over."""
    from mlplatform.errors import JobFailed

    with _guard(trigger_dir):
        holder = running(trigger_dir)
        if holder is not None and holder.get("pid") != os.getpid():
            raise JobFailed(f"another pipeline run ({holder.get('run_id')}, pid {holder.get('pid')}) is in "
                            f"progress", {"mode": "pipeline", "running": holder})
        with open(os.path.join(trigger_dir, LOCK), "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "run_id": run_id, "since": time.time()}, f)
    try:
        yield
    finally:
        with _guard(trigger_dir), contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(trigger_dir, LOCK))


def consume_triggers(trigger_dir: str, run_id: str) -> list[dict[str, Any]]:
    """Every pending trigger file, moved to consumed/<run_id>/ and returned for the lineage."""
    if not os.path.isdir(trigger_dir):
        return []
    out = []
    dest = os.path.join(trigger_dir, "consumed", run_id)
    for name in sorted(os.listdir(trigger_dir)):
        path = os.path.join(trigger_dir, name)
        if not name.endswith(".json") or name == LAST_START or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue
        os.makedirs(dest, exist_ok=True)
        os.replace(path, os.path.join(dest, name))
    return out


def start_guarded(trigger_dir: str, command: list[str], cooldown_s: float) -> bool:
    """Start `command` detached unless a run is in progress or one started within cooldown_s."""
    with _guard(trigger_dir):
        if running(trigger_dir) is not None:
            return False
        last_path = os.path.join(trigger_dir, LAST_START)
        try:
            with open(last_path, encoding="utf-8") as f:
                last = float(json.load(f)["ts"])
        except (OSError, ValueError, KeyError):
            last = 0.0
        now = time.time()
        if now - last < cooldown_s:
            return False
        proc = subprocess.Popen(list(command), start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        with open(last_path, "w", encoding="utf-8") as f:
            json.dump({"ts": now, "pid": proc.pid, "command": list(command)}, f)
        return True
