"""The reconciler's state machine: pure, no Ray, no git, no clock of its own.

States:
- `pending`: nothing applied yet by this reconciler;
- `applying`: a commit is being composed, validated and applied;
- `synced`: the running app is the last applied commit;
- `failed`: the newest commit was refused (invalid config) or its apply failed; the cluster
  keeps serving `applied`, the last good commit;
- `drifted`: the running app differs from `applied` (a deploy by hand), and self-healing is off.

Inputs are the events below; each returns the action the driver takes next (`apply` a
commit, or nothing). An invalid commit is never retried: it is refused until the branch
moves. A failed apply of a valid commit (Serve did not start it in time) is retried at the
next poll, since its cause may be transient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STATES = ("pending", "applying", "synced", "failed", "drifted")


@dataclass
class SyncState:
    state: str = "pending"
    applied: str | None = None        # the last good commit, the one serving
    seen: str | None = None           # the branch's head at the last poll
    target: str | None = None         # the commit being applied
    failed: str | None = None         # the commit refused, while it is the head
    retry: bool = False               # the failure was an apply, not an invalid config
    error: str | None = None          # the failure's one line
    drift: list[str] = field(default_factory=list)  # differing keys, running vs applied
    applied_ts: float | None = None
    changed_ts: float | None = None   # when `state` last changed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _to(self, state: str, now: float) -> None:
        if state != self.state:
            self.changed_ts = now
        self.state = state


def head_seen(s: SyncState, commit: str, now: float) -> str | None:
    """The branch's head at a poll. Returns the commit to apply, or None."""
    s.seen = commit
    if commit == s.applied and s.state != "failed":
        return None
    if commit == s.failed and not s.retry:
        return None  # refused already; waits for the next commit
    if commit == s.applied:  # the branch moved back to the serving commit after a refusal
        s.failed, s.error, s.retry = None, None, False
        s._to("drifted" if s.drift else "synced", now)
        return None
    s.target = commit
    s._to("applying", now)
    return commit


def invalid(s: SyncState, commit: str, error: str, now: float) -> None:
    """The commit's config did not compose or validate: refused, `applied` keeps serving."""
    s.failed, s.retry, s.error, s.target = commit, False, error, None
    s._to("failed", now)


def apply_failed(s: SyncState, commit: str, error: str, now: float) -> None:
    """A valid config that Serve did not bring up: retried at the next poll."""
    s.failed, s.retry, s.error, s.target = commit, True, error, None
    s._to("failed", now)


def applied(s: SyncState, commit: str, now: float) -> None:
    s.applied, s.applied_ts, s.target = commit, now, None
    s.failed, s.retry, s.error, s.drift = None, False, None, []
    s._to("synced", now)


def drift_checked(s: SyncState, differences: list[str], self_heal: bool, now: float) -> str | None:
    """The running app compared with `applied`. Returns the commit to re-apply (self-heal), or None."""
    s.drift = list(differences)
    if s.applied is None or s.state in ("applying", "pending"):
        return None
    if differences and self_heal:
        s.target = s.applied
        s._to("applying", now)
        return s.applied
    if s.state == "failed":
        return None  # the refusal stays the headline; the drift is listed beside it
    s._to("drifted" if differences else "synced", now)
    return None


def failing(s: SyncState) -> bool:
    return s.state == "failed"


def fetch_failed(s: SyncState, error: str, now: float) -> None:
    """The branch could not be read (remote down, branch gone): failing, nothing changes."""
    s.failed, s.retry, s.error, s.target = None, True, error, None
    s._to("failed", now)
