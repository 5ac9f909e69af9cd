"""Config tree: every group composes, every _target_ instantiates, bad values give one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from mlplatform.errors import ConfigError
from mlplatform.modes import MODES

from .conftest import CONF, compose, run_cli


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


@pytest.mark.parametrize("option", _options("data"))
def test_every_data_option_composes(option: str, tmp_path: Path) -> None:
    extra = [f"data.root={tmp_path}"] if option == "folder" else []
    cfg = compose(f"data={option}", f"paths.root={tmp_path}", *extra)
    assert cfg.data.name
    assert abs(cfg.data.splits.train + cfg.data.splits.val + cfg.data.splits.test - 1) < 1e-9


@pytest.mark.parametrize("option", _options("model"))
def test_every_model_instantiates_and_predicts(option: str) -> None:
    cfg = compose(f"model={option}")
    model = instantiate(cfg.model, num_classes=7).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        logits, emb = model(x), model.embed(x)
    assert logits.shape == (2, 7)
    assert emb.shape == (2, model.embed_dim)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_composes_with_smoke(mode: str, tmp_path: Path) -> None:
    cfg = compose(f"+mode={mode}", "+experiment=smoke", f"paths.root={tmp_path}")
    assert cfg.data.synthetic.num_classes < 20  # the smoke experiment applied


def test_pretrained_weights_load_from_local_file(tmp_path: Path) -> None:
    cfg = compose("model=tiny_cnn")
    src = instantiate(cfg.model, num_classes=5)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    cfg = compose("model=tiny_cnn", f"model.weights_path={path}")
    loaded = instantiate(cfg.model, num_classes=5)
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.splits.train=1.5", "data.splits.train=1.5"),
        ("data.splits.train=0.5", "data.splits"),  # 0.5+0.1+0.1 != 1
        ("data.synthetic.num_classes=0", "data.synthetic.num_classes=0"),
        ("data.max_per_class=-3", "data.max_per_class=-3"),
        ("data.since=yesterday", "data.since=yesterday"),
        ("data.synthetic.drift.kinds=[fog]", "data.synthetic.drift.kinds=fog"),
        ("data.preprocess.interpolation=lanczos9", "data.preprocess.interpolation=lanczos9"),
        ("ray.address=nowhere", "ray.address=nowhere"),
        ("model.weights_path=/no/such/file.pt", "model.weights_path=/no/such/file.pt"),
        ("serve.block=maybe", "serve.block=maybe"),
        ("serve.batching.max_batch_size=100", "serve.deployment.max_ongoing_requests=64"),
        ("serve.accelerator.threads=-1", "serve.accelerator.threads=-1"),
        ("serve.versions=[{ref: v1, role: stable, weight: 90}]", "serve.versions=90"),
        ("serve.shadows=[{ref: v2, mirror: 1.5}]", "serve.shadows[0].mirror=1.5"),
    ],
)
def test_semantic_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose("+mode=data", override)
    assert str(info.value).startswith(key)
    assert "\n" not in str(info.value)


def test_cli_bad_value_is_one_line_exit_2() -> None:
    proc = run_cli("+mode=data", "data.splits.train=1.5")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.splits.train=1.5" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["data.splits.train=abc"], "data.splits.train=abc"),  # wrong type, caught at compose time
        (["data.colour=red"], "data.colour=red"),  # typo'd key, closed by the schema
        (["data=nope"], "data=nope"),  # unknown group option
        (["data=folder"], "data.root=???"),  # missing mandatory value
    ],
)
def test_cli_compose_errors_are_one_line(args: list[str], needle: str) -> None:
    proc = run_cli("+mode=data", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_no_mode_lists_the_modes() -> None:
    proc = run_cli()
    assert proc.returncode != 0
    for mode in MODES:
        assert mode in proc.stderr


def test_unknown_mode_lists_the_modes() -> None:
    proc = run_cli("+mode=bogus")
    assert proc.returncode != 0
    assert "bogus" in proc.stderr and "data" in proc.stderr
