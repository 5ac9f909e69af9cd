"""`python -m mlplatform +mode=<mode> [overrides]`: run.py for an installed platform (a wheel
in an image, a RayJob's entrypoint), from any working directory.

The config is conf/ of the checkout this package was imported from, else the copy the wheel
carries (mlplatform/conf): mlplatform.cli_check.CONF_DIR.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mlplatform.cli import check_argv, run_task
from mlplatform.cli_check import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_task(cfg)


if __name__ == "__main__":
    check_argv(sys.argv[1:], CONF_DIR)
    main()
