"""The one entry point: `python run.py +mode=<mode> [overrides]`.

Compose the Hydra config, validate it, dispatch from the mode table and print one line of
JSON that summarises what the mode did. User errors are one line, never a traceback:
exit 2 for a bad config, 1 for a job whose checks failed.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mlplatform.config import register_configs, validate
from mlplatform.errors import ConfigError, JobFailed
from mlplatform.modes import MODES, usage

log = logging.getLogger("run")
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


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    mode = HydraConfig.get().runtime.choices.get("mode")
    try:
        validate(cfg)
        summary = MODES[mode][0](cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        _summary_line({**exc.summary, "status": "failed", "error": str(exc)})
        sys.exit(1)
    _summary_line({**summary, "status": "ok"})


def cli() -> None:
    argv = sys.argv[1:]
    if not any(a.startswith("-") for a in argv):  # --help, --cfg, -m: leave them to Hydra
        mode = _mode_from_argv(argv)
        if mode is None or mode not in MODES:
            if mode is not None:
                print(f"error: +mode={mode}: unknown mode", file=sys.stderr)
            print(usage(), file=sys.stderr)
            sys.exit(2)
        from mlplatform.cli_check import check_overrides

        check_overrides(argv, os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))
    main()


if __name__ == "__main__":
    cli()
