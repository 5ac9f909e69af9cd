"""The config: typed schemas behind `conf/` (schema.py), semantic checks (validate.py), and
the typed serve settings that deployments receive (serve.py)."""

from mlplatform.config.schema import PIPELINE_STEPS, register_configs
from mlplatform.config.validate import DRIFT_KINDS, parse_since, validate, validate_serve

__all__ = ["DRIFT_KINDS", "PIPELINE_STEPS", "parse_since", "register_configs", "validate", "validate_serve"]
