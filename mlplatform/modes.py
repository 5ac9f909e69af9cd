"""The mode table: `+mode=<name>` -> a plain function of the composed config.

Each function returns the summary that run.py prints as the last line of JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig


def _data(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.data.job import run_data
    from mlplatform.raycluster import ray_session

    with ray_session(cfg.ray):
        return run_data(cfg)


# Imports stay inside the functions: listing the modes or a config error must not pay for torch.
MODES: dict[str, tuple[Callable[[DictConfig], dict[str, Any]], str]] = {
    "data": (_data, "ingest with Ray Data, split, check quality, write the snapshot manifest"),
}


def usage() -> str:
    lines = ["usage: python run.py +mode=<mode> [key=value ...]", "", "modes:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in MODES.items()]
    return "\n".join(lines)
