"""Pretrained weights: a file that fits no tensor is an error, a partial fit says what it skipped."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlplatform.errors import ConfigError
from mlplatform.models import WeightsMismatch, check_weights, tiny_cnn


def test_weights_matching_no_tensor_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3), "encoder.bias": torch.zeros(3)}, path)
    with pytest.raises(ConfigError) as info:
        tiny_cnn(num_classes=5, weights_path=str(path))
    assert str(info.value).startswith(f"model.weights_path={path}: matches none of the model's")
    assert "encoder.weight" in str(info.value)


def test_weights_of_the_right_names_but_other_shapes_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "wide.safetensors"
    save_file({k: torch.zeros(*v.shape, 2) for k, v in tiny_cnn(num_classes=5).state_dict().items()
               if v.dim() > 0}, str(path))
    with pytest.raises(WeightsMismatch, match="model.weights_path="):
        tiny_cnn(num_classes=5, weights_path=str(path))


def test_the_error_crosses_a_process_boundary_whole(tmp_path: Path) -> None:
    exc = pickle.loads(pickle.dumps(WeightsMismatch(str(tmp_path / "w.pt"), "matches none")))
    assert isinstance(exc, ConfigError) and exc.key == "model.weights_path"
    assert str(exc) == f"model.weights_path={tmp_path / 'w.pt'}: matches none"


def test_a_partial_fit_loads_what_fits_and_warns_about_the_rest(tmp_path: Path, caplog) -> None:
    src = tiny_cnn(num_classes=8)
    path = tmp_path / "eight-species.pt"
    torch.save(src.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="mlplatform.models"):
        model = tiny_cnn(num_classes=5, weights_path=str(path))
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, model.state_dict()[k]), k
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0]
    assert "head.weight [8, 128] vs [5, 128]" in warnings[0] and "left as initialised: 2" in warnings[0]


def test_a_full_fit_warns_about_nothing(tmp_path: Path, caplog) -> None:
    path = tmp_path / "same.pt"
    torch.save(tiny_cnn(num_classes=5).state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="mlplatform.models"):
        tiny_cnn(num_classes=5, weights_path=str(path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_job_checks_the_weights_file_before_any_worker_starts(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ConfigError, match="model.weights_path="):
        check_weights({"_target_": "mlplatform.models.tiny_cnn", "weights_path": str(path)}, num_classes=5)
    check_weights({"_target_": "no.such.builder", "weights_path": None}, num_classes=5)  # builds nothing
