"""The one entry point: `python run.py +mode=<mode> [overrides]`.

Compose the Hydra config from conf/ beside this file, validate it, dispatch from the mode
table and print one line of JSON that summarises what the mode did (mlplatform/cli.py, shared
with `python -m mlplatform`, the installed platform's entry point). User errors are one line,
never a traceback: exit 2 for a bad config, 1 for a job whose checks failed.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from mlplatform.cli import check_argv, run_task

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_task(cfg)


def cli() -> None:
    check_argv(sys.argv[1:], CONF_DIR)
    main()


if __name__ == "__main__":
    cli()
