"""What `python run.py` and `python -m mlplatform` share: the argument check before Hydra
runs, and the task that validates the composed config, dispatches the mode and prints its
one-line JSON summary. User errors are one line, never a traceback: exit 2 for a bad config,
1 for a job whose checks failed."""

from __future__ import annotations

import json
import sys

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mlplatform import progress
from mlplatform.config import register_configs, validate
from mlplatform.errors import ConfigError, JobFailed
from mlplatform.modes import MODES, usage

register_configs()


def _mode_from_argv(argv: list[str]) -> str | None:
    for arg in argv:
        for prefix in ("+mode=", "mode=", "++mode="):
            if arg.startswith(prefix):
                return arg[len(prefix):]
    return None


def _summary_line(summary: dict) -> None:
    """The mode's last line: JSON on a line of its own, even after progress bars on stderr."""
    sys.stderr.write("\n")
    sys.stderr.flush()
    print(json.dumps(summary, default=str), flush=True)


def check_argv(argv: list[str], config_dir: str) -> None:
    """Exit 2 with one line (and the usage) for an unknown or missing mode or a bad override."""
    if any(a.startswith("-") for a in argv):  # --help, --cfg, -m: leave them to Hydra
        return
    mode = _mode_from_argv(argv)
    if mode is None or mode not in MODES:
        if mode is not None:
            print(f"error: +mode={mode}: unknown mode", file=sys.stderr)
        print(usage(), file=sys.stderr)
        sys.exit(2)
    from mlplatform.cli_check import check_overrides

    check_overrides(argv, config_dir)


def run_task(cfg: DictConfig) -> None:
    """The body of the Hydra main function of both entry points."""
    mode = HydraConfig.get().runtime.choices.get("mode")
    # Before any Ray process starts: they inherit what Ray's own output is quiet about.
    progress.configure(debug=bool(HydraConfig.get().verbose))
    try:
        validate(cfg, mode)
        summary = MODES[mode][0](cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        _summary_line({**exc.summary, "status": "failed", "error": str(exc)})
        sys.exit(1)
    _summary_line({**summary, "status": "ok"})
