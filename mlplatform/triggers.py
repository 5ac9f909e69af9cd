"""The trigger directory: how monitoring asks the pipeline for a retrain.

An alert with `monitor.alerts.action=retrain` writes a trigger file here (`write_trigger`)
and may start the configured command (`start_guarded`); a pipeline run reads the pending
triggers when it starts and moves them away only once it finishes
(`mlplatform.pipeline.triggers`), so a failed run leaves them for the next one.

    <trigger_dir>/<ms>-<version>-<kind>-<detector>.json  one per alert: the alert record
    <trigger_dir>/pipeline.lock                          the running pipeline: pid, run_id, since
    <trigger_dir>/last_start.json                        the last started command: ts, pid, log
    <trigger_dir>/retrain-<UTC time>.log                 a started command's stdout and stderr
    <trigger_dir>/consumed/<run_id>/                     the triggers a finished run answered

`start_guarded` makes one alert storm start one pipeline run: under an exclusive file lock
it starts nothing while a run holds the pipeline lock or within `cooldown_s` of the last
start; that run answers every trigger present when it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from mlplatform import storage

LOCK = "pipeline.lock"
LAST_START = "last_start.json"
CONSUMED = "consumed"


def write_trigger(trigger_dir: str, alert: dict[str, Any]) -> str:
    """The alert as a trigger file (a path or a filesystem URI); returns its path."""
    path = storage.join(trigger_dir, f"{int(alert['ts'] * 1000)}-{alert['version']}-{alert['kind']}-"
                                     f"{alert['detector']}.json")
    storage.write_json(path, alert)
    return path


def pending(trigger_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """The trigger files not answered yet, oldest first: (file name, alert record). A file
    that cannot be read (being written, or cut by a crash) is left for a later look."""
    if not os.path.isdir(trigger_dir):
        return []
    out = []
    for name in sorted(os.listdir(trigger_dir)):
        path = os.path.join(trigger_dir, name)
        if not name.endswith(".json") or name == LAST_START or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                out.append((name, json.load(f)))
        except (OSError, ValueError):
            continue
    return out


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
def guard(trigger_dir: str) -> Iterator[None]:
    """An exclusive lock over the directory's bookkeeping (lock file, last start)."""
    os.makedirs(trigger_dir, exist_ok=True)
    with open(os.path.join(trigger_dir, ".guard"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# The commands this process started, by log file, until exit_status reads how they ended
# (holding the Popen also keeps Python from reaping the child behind our back).
_started: dict[str, subprocess.Popen] = {}


def exit_status(log_path: str) -> int | None:
    """The exit code of the command `start_guarded` started with this log, once it has ended
    (then forgotten); None while it runs. KeyError for a log this process did not start."""
    code = _started[log_path].poll()
    if code is not None:
        del _started[log_path]
    return code


def start_guarded(trigger_dir: str, command: list[str], cooldown_s: float) -> str | None:
    """Start `command` detached unless a run is in progress or one started within
    cooldown_s. Returns the log file its stdout and stderr go to, or None if nothing started."""
    with guard(trigger_dir):
        if running(trigger_dir) is not None:
            return None
        last_path = os.path.join(trigger_dir, LAST_START)
        try:
            with open(last_path, encoding="utf-8") as f:
                last = float(json.load(f)["ts"])
        except (OSError, ValueError, KeyError):
            last = 0.0
        now = time.time()
        if now - last < cooldown_s:
            return None
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3]
        log_path = os.path.join(trigger_dir, f"retrain-{stamp}.log")
        with open(log_path, "ab") as log:
            log.write(f"$ {shlex.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(list(command), start_new_session=True, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        with open(last_path, "w", encoding="utf-8") as f:
            json.dump({"ts": now, "pid": proc.pid, "command": list(command), "log": log_path}, f)
        _started[log_path] = proc
        return log_path
