"""User-facing failures: run.py turns them into one line and an exit code, never a traceback."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad config value: exit code 2, one line naming the key and the value."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={_fmt(value)}: {reason}")


class JobFailed(RuntimeError):
    """A job ran but its checks failed (a quality gate, say): exit code 1, summary still printed."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def _fmt(value: Any) -> str:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value)
    except ImportError:  # pragma: no cover
        pass
    return str(value)
