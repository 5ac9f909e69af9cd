"""Compose the config once before Hydra runs, so a bad override is one line and exit code 2.

Hydra's own reports of a bad override span several lines and exit 1; this check turns
the same failures (typos, wrong types, unknown group options, missing values) and the
semantic checks of `mlplatform.config.validate` into `error: key=value: reason`.
"""

from __future__ import annotations

import os
import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mlplatform.config import register_configs, validate
from mlplatform.errors import ConfigError


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), str(text))


def _describe(exc: BaseException, overrides: list[str]) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            key = cause.full_key
            given = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
            head = given.lstrip("+~") if given else key
            return f"{head}: {_first_line(getattr(cause, 'msg', cause))}"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, MissingConfigException) and exc.options:
        group, _, name = (exc.missing_cfg_file or "?/?").rpartition("/")
        options = sorted(o for o in exc.options if not o.startswith("base_"))
        return f"{group}={name}: unknown option; available: {', '.join(options)}"
    return _first_line(str(exc))


def compose_checked(config_dir: str, overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose, resolve and validate; raises ConfigError with one line on any user error."""
    register_configs()  # the structured schemas conf/ builds on: a fresh (spawned) process has none
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(exc.full_key, "???", "missing value: set it on the command line or in YAML") from None
    except (HydraException, OverrideParseException, OmegaConfBaseException) as exc:
        raise _Line(_describe(exc, overrides)) from None
    validate(cfg, _mode(overrides))
    return cfg


def _mode(overrides: list[str]) -> str | None:
    return next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("mode=")), None)


class _Line(ConfigError):
    """A ConfigError whose text is already the whole line."""

    def __init__(self, line: str) -> None:  # noqa: D107
        ValueError.__init__(self, line)
        self.key, self.value, self.reason = line.split("=", 1)[0], "", line


def _conf_dir() -> str:
    """conf/ beside run.py when this package is a checkout's (an editable install), else the
    copy an installed wheel carries as mlplatform/conf."""
    package = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(package)
    if os.path.isfile(os.path.join(checkout, "run.py")) and os.path.isdir(os.path.join(checkout, "conf")):
        return os.path.join(checkout, "conf")
    return os.path.join(package, "conf")


# The config `python -m mlplatform` composes, and tools that need the defaults (benchmarks).
CONF_DIR = _conf_dir()


def compose_defaults(*overrides: str) -> DictConfig:
    """The config `python run.py <overrides>` would see, composed from CONF_DIR."""
    return compose_checked(CONF_DIR, list(overrides))


def check_overrides(argv: list[str], config_dir: str) -> None:
    try:
        compose_checked(config_dir, argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
