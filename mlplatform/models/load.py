"""Load a registered version as an eval-mode model (no Ray needed: serving replicas and
offline tools use it as they are)."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate

from mlplatform.data.preprocess import PreprocessSpec
from mlplatform.models import Classifier
from mlplatform.registry.store import Registry


def load_model(reg: Registry, ref: str) -> tuple[Classifier, PreprocessSpec, dict[str, Any]]:
    """A registered version as an eval-mode model; the weights' checksum is verified first."""
    meta = reg.get(ref)
    model_cfg = dict(meta["config"]["model"])
    model_cfg["weights_path"] = None  # the registry holds the weights; never reload a pretrained file
    model = instantiate(model_cfg, num_classes=len(meta["labels"]))
    model.load_state_dict(reg.load_state_dict(meta["version"]))
    return model.eval(), PreprocessSpec.from_dict(meta["preprocess"]), meta
