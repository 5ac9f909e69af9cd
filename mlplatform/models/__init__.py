"""Model builders, referenced from `conf/model/*.yaml` through `_target_`.

Every model is a `Classifier`: a body that maps images to a penultimate-layer embedding
(what drift monitoring watches) and a linear head that maps the embedding to species scores.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torchvision
from torch import nn

from mlplatform.errors import ConfigError

log = logging.getLogger(__name__)

TORCHVISION_MODELS = ("mobilenet_v3_small", "resnet18", "resnet50", "efficientnet_b0")


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(embed_dim, num_classes)
        self.embed_dim = embed_dim
        self.num_classes = num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TinyBody(nn.Module):
    """A few conv blocks and global pooling: learns the synthetic species in a minute on a CPU."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, width * 2, width * 4]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class WeightsMismatch(ConfigError):
    """`model.weights_path` names a file none of whose tensors fit the model."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__("model.weights_path", path, reason)

    def __reduce__(self) -> tuple:  # crosses Ray's process boundary whole, not as a bare message
        return type(self), (self.value, self.reason)


def _load_weights(model: nn.Module, weights_path: str) -> None:
    """Local pretrained weights only (nothing is downloaded); a mismatched head is skipped.

    A file that fits no tensor would leave the model as initialised while the config claims
    pretrained weights: that is an error. A partial fit is normal (a new head) and is logged.
    """
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"model.weights_path={weights_path}: file does not exist")
    if weights_path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(weights_path)
    else:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise WeightsMismatch(weights_path, f"holds a {type(state).__name__}, not a state dict of tensors")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise WeightsMismatch(weights_path, f"matches none of the model's {len(own)} tensors "
                                            f"(the file holds {len(state)}, e.g. {sorted(state)[:3]}; "
                                            f"the model expects e.g. {list(own)[:3]})")
    unknown = sorted(k for k in state if k not in own)
    reshaped = sorted(f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
                      for k in state if k in own and k not in usable)
    untouched = sorted(k for k in own if k not in usable)
    model.load_state_dict(usable, strict=False)
    if unknown or reshaped or untouched:
        log.warning("model.weights_path=%s: loaded %d of the model's %d tensors; not in the model: %d %s; "
                    "shape differs: %d %s; left as initialised: %d %s", weights_path, len(usable), len(own),
                    len(unknown), unknown[:5], len(reshaped), reshaped[:5], len(untouched), untouched[:5])
    else:
        log.info("model.weights_path=%s: loaded all %d tensors", weights_path, len(usable))


def check_weights(model_cfg: Any, num_classes: int) -> None:
    """Build the model once where the job starts, when it loads a weights file: a file that
    fits no tensor then fails as one line naming model.weights_path, not inside every Ray
    Train worker and again on each of its retries."""
    if model_cfg.get("weights_path"):
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            instantiate(model_cfg, num_classes=num_classes)
        except InstantiationException as exc:  # Hydra wraps what the builder raised
            if isinstance(exc.__cause__, ConfigError):
                raise exc.__cause__ from None
            raise


def tiny_cnn(num_classes: int, width: int = 32, weights_path: str | None = None) -> Classifier:
    body = TinyBody(width)
    model = Classifier(body, body.out_dim, num_classes)
    if weights_path:
        _load_weights(model, weights_path)
    return model


def torchvision_model(name: str, num_classes: int, weights_path: str | None = None,
                      dropout: float | None = None, bn_momentum: float | None = None) -> Classifier:
    """A torchvision architecture built with weights=None; its last Linear becomes our head.

    `bn_momentum` overrides BatchNorm's running-statistics momentum: MobileNetV3 and
    EfficientNet ship 0.01, tuned for long ImageNet runs, which leaves the running
    statistics far behind the weights in a short from-scratch run (eval accuracy at chance).
    """
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"model.name={name}: one of {', '.join(TORCHVISION_MODELS)}")
    kwargs = {"dropout": dropout} if dropout is not None and name != "resnet18" and name != "resnet50" else {}
    net = getattr(torchvision.models, name)(weights=None, **kwargs)
    if weights_path:
        _load_weights(net, weights_path)  # torchvision's own key names, e.g. an ImageNet checkpoint
    if bn_momentum is not None:
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = bn_momentum
    last_name, last = None, None
    for mod_name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            last_name, last = mod_name, mod
    assert last_name is not None and last is not None
    parent = net.get_submodule(last_name.rsplit(".", 1)[0]) if "." in last_name else net
    setattr(parent, last_name.rsplit(".", 1)[-1], nn.Identity())
    return Classifier(net, last.in_features, num_classes)
