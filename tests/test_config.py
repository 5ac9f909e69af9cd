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
    # Serve in the cluster is off loopback (deploy.serve_host): keys, or open said explicitly.
    extra = ("serve.auth.required=false",) if mode == "deploy" else ()
    cfg = compose(f"+mode={mode}", "+experiment=smoke", f"paths.root={tmp_path}", *extra)
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
        ("train.report_poll_s=0", "train.report_poll_s=0"),
        ("model.weights_path=/no/such/file.pt", "model.weights_path=/no/such/file.pt"),
        ("serve.block=maybe", "serve.block=maybe"),
        ("serve.batching.max_batch_size=100", "serve.deployment.max_ongoing_requests=64"),
        ("serve.accelerator.threads=-1", "serve.accelerator.threads=-1"),
        ("serve.versions=[{ref: v1, role: stable, weight: 90}]", "serve.versions=90"),
        ("serve.shadows=[{ref: v2, mirror: 1.5}]", "serve.shadows[0].mirror=1.5"),
        ("serve.ingress.min_replicas=0", "serve.ingress.min_replicas=0"),
        ("serve.ingress.max_replicas=0", "serve.ingress.max_replicas=0"),
        ("serve.ingress.max_replicas_per_node=0", "serve.ingress.max_replicas_per_node=0"),
        ("serve.deployment.max_replicas_per_node=101", "serve.deployment.max_replicas_per_node=101"),
        ("serve.versions=[{ref: v1, role: stable, weight: 100, deployment: {max_replicas_per_node: 0}}]",
         "serve.versions[0].deployment.max_replicas_per_node=0"),
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


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ("serve.batchin.max_batch_size=8", "serve.batchin"),  # misspelt group, closed schema
        ("+serve.versions.0.deployment.max_replica=3", "serve.versions[0].deployment.max_replica"),
        ("+serve.versions.0.deployment.num_cpus=lots", "serve.versions[0].deployment.num_cpus"),
        ("serve.inputs.max_pixel=10", "serve.inputs.max_pixel"),
        ("serve.inputs.formats=[]", "serve.inputs.formats"),
        ("serve.inputs.formats=[JPEG,FOO]", "serve.inputs.formats=FOO"),
        ("serve.inputs.url.schemes=[ftp]", "serve.inputs.url.schemes"),
        ("serve.inputs.url.allowed_hosts=[http://cdn.example/x]", "serve.inputs.url.allowed_hosts"),
        ("serve.deployment.max_ongoing_requests=8", "serve.deployment.max_ongoing_requests"),
        ("serve.ingress_replicas=2", "serve.ingress_replicas"),  # replaced by serve.ingress.*
    ],
)
def test_a_bad_serve_key_fails_before_ray_with_the_key_named(arg: str, needle: str) -> None:
    """Checked by the CLI's compose step, which runs before any Ray work: one line, exit 2."""
    proc = run_cli("+mode=serve", arg, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_a_version_override_merges_onto_the_deployment_defaults() -> None:
    from omegaconf import OmegaConf

    from mlplatform.config.schema import ServeDeploymentConf

    cfg = compose("+serve.versions.0.deployment.max_replicas=5")
    merged = OmegaConf.merge(OmegaConf.structured(ServeDeploymentConf), cfg.serve.deployment,
                             cfg.serve.versions[0].deployment)
    assert merged.max_replicas == 5 and merged.min_replicas == cfg.serve.deployment.min_replicas
