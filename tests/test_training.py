"""Training on a real local Ray: Train V2 with 1 and 2 workers, resume, Tune, registry, gate."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mlplatform.registry.store import Registry
from mlplatform.tracking import read_offline_run
from mlplatform.training.gate import judge

from .conftest import accelerator, compose, run_cli

CHANCE = 1 / 8  # the smoke experiment has 8 species


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """`python run.py +mode=train +experiment=smoke` exactly as the README says."""
    root = tmp_path_factory.mktemp("train")
    proc = run_cli("+mode=train", "+experiment=smoke", f"paths.root={root}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


def _registry(root: Path) -> Registry:
    return Registry(str(root / "registry"), "species-classifier")
@pytest.mark.ray


def test_cli_train_registers_v1_with_metrics_gate_and_card(trained) -> None:
    root, summary = trained
    assert summary["mode"] == "train" and summary["version"] == "v1"
    for key in ("test/acc", "test/top5", "test/macro_f1", "test/ece"):
        assert key in summary["metrics"]
    assert summary["metrics"]["test/acc"] > 2.5 * CHANCE  # well above chance
    assert summary["gate"]["verdict"] == "blessed" and summary["gate"]["baseline"] is None
    assert summary["aliases"] == {"candidate": "v1", "production": "v1"}  # first blessed bootstraps production
    card = Path(summary["model_card"]).read_text()
    for section in ("Intended use", "Out-of-scope", "Training data", "Worst species", "Calibration",
                    "Promotion gate", "Known limitations", "# Model card: species-classifier v1"):
        assert section in card, section
@pytest.mark.ray


def test_version_holds_weights_lineage_and_reference(trained) -> None:
    import numpy as np

    root, summary = trained
    reg = _registry(root)
    meta = reg.get("v1")
    history = meta["history"]
    assert history[-1]["train/loss"] < history[0]["train/loss"]  # loss falls
    assert meta["data_snapshot"]["hash"].startswith(summary["data_snapshot"])
    assert meta["git_commit"] and meta["config"]["train"]["epochs"] == 8
    assert meta["preprocess"]["labels"] == meta["labels"] and len(meta["labels"]) == 8
    for name in ("label_map.json", "model_card.md", "confusion_matrix.png", "reference.npz", "metrics.json"):
        assert name in meta["files"], name
    ref = np.load(reg.path("v1", "reference.npz"), allow_pickle=False)
    expected = min(48, meta["data_snapshot"]["splits"]["val"])  # train.reference_samples in smoke
    assert ref["embeddings"].ndim == 2 and ref["embeddings"].shape[0] == expected
    assert abs(ref["predicted_class_frequencies"].sum() - 1) < 1e-6
    state = reg.load_state_dict("production")
    assert any(k.startswith("head.") for k in state)
@pytest.mark.ray


def test_offline_wandb_run_holds_the_metrics(trained) -> None:
    root, summary = trained
    files = glob.glob(os.path.join(root, "wandb", f"offline-run-*-{summary['run']}", "*.wandb"))
    assert len(files) == 1, files  # rank 0 alone logs: one run
    rec = read_offline_run(files[0])
    epochs = [h for h in rec["history"] if "val/acc" in h]
    assert len(epochs) == summary["epochs_run"]
    assert any(abs(h.get("test/acc", -1) - summary["metrics"]["test/acc"]) < 1e-6 for h in rec["history"])
    assert rec["record_counts"].get("artifact") == 1  # the model
@pytest.mark.ray


def test_second_run_is_judged_against_production(ray_cluster, trained) -> None:
    from mlplatform.training.job import run_train

    root, _ = trained
    cfg = compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none",
                  "train.gate.min_gain=0.5")  # an impossible gain: must be rejected
    out = run_train(cfg)
    assert out["version"] == "v2" and out["gate"]["baseline"] == "v1"
    assert out["gate"]["verdict"] == "rejected" and "gain over v1" in out["gate"]["reasons"][0]
    assert out["aliases"]["production"] == "v1"
    reg = _registry(root)
    assert reg.get("v2")["parent"] == "v1" and reg.latest_verdict("v2")["verdict"] == "rejected"
@pytest.mark.ray


def test_registry_evaluate_and_promote_modes(ray_cluster, trained) -> None:
    from mlplatform.registry.mode import run_registry
    from mlplatform.training.evaluate import run_evaluate, run_promote

    root, _ = trained
    listing = run_registry(compose("+mode=registry", f"paths.root={root}"))
    assert listing["versions"][0] == "v1" and listing["aliases"]["production"] == "v1"
    moved = run_registry(compose("+mode=registry", f"paths.root={root}", "registry.set_alias=staging:v1"))
    assert moved["aliases"]["staging"] == "v1"

    clean = run_evaluate(compose("+mode=evaluate", "+experiment=smoke", f"paths.root={root}",
                                 "evaluate.version=production"))
    drifted = run_evaluate(compose("+mode=evaluate", "+experiment=smoke", f"paths.root={root}",
                                   "data=synthetic_drifted", "evaluate.split=all"))
    assert Path(drifted["report_md"]).is_file() and drifted["dataset"] == "synthetic_drifted"
    assert drifted["metrics"]["test/num_samples"] == 8 * 60
    assert drifted["metrics"]["test/acc"] < clean["metrics"]["test/acc"]  # drift hurts

    verdict = run_promote(compose("+mode=promote", "+experiment=smoke", f"paths.root={root}",
                                  "promote.candidate=v1"))
    assert verdict["candidate"] == "v1" and verdict["baseline"] is None and verdict["verdict"] == "blessed"


def test_report_poll_reaches_ray_train_unless_the_user_exported_it(monkeypatch) -> None:
    """Ray Train's controller reads its poll interval from the driver's environment only."""
    from mlplatform.training import job

    cfg = compose("+mode=train", "+experiment=smoke", "train.report_poll_s=0.5")
    spec = job.PreprocessSpec(32, 32, (0.5,) * 3, (0.5,) * 3, "bilinear").with_labels(["a", "b"])
    monkeypatch.delenv(job.POLL_ENV, raising=False)
    job.make_trainer(cfg, OmegaConf.to_container(cfg, resolve=True), spec, {}, "t", "/tmp/unused")
    assert os.environ[job.POLL_ENV] == "0.5"
    monkeypatch.setattr(job, "_USER_POLL", "3")
    monkeypatch.setenv(job.POLL_ENV, "3")
    job.make_trainer(cfg, OmegaConf.to_container(cfg, resolve=True), spec, {}, "t", "/tmp/unused")
    assert os.environ[job.POLL_ENV] == "3"


def test_gate_blesses_and_rejects_on_crafted_metrics() -> None:
    gate = OmegaConf.create({"min_test_acc": 0.6, "min_gain": 0.01, "max_recall_drop": 0.1})

    def summary(acc: float, recalls: dict[str, float]) -> dict:
        return {"test/acc": acc, "per_class": {k: {"recall": r, "support": 10} for k, r in recalls.items()}}

    prod = summary(0.70, {"a": 0.7, "b": 0.7})
    assert judge(summary(0.75, {"a": 0.75, "b": 0.75}), prod, gate)["blessed"]
    low = judge(summary(0.55, {"a": 0.9, "b": 0.2}), None, gate)
    assert not low["blessed"] and low["first_model"] and "test/acc 0.5500 < 0.6" in low["reasons"][0]
    assert judge(summary(0.65, {}), None, gate)["blessed"]  # a first model: absolute threshold only
    flat = judge(summary(0.705, {"a": 0.7, "b": 0.71}), prod, gate)
    assert not flat["blessed"] and any("gain" in r for r in flat["reasons"])
    dropped = judge(summary(0.80, {"a": 0.95, "b": 0.55}), prod, gate)
    assert not dropped["blessed"] and any("(b)" in r for r in dropped["reasons"])
@pytest.mark.ray


def test_two_workers_ddp_over_gloo(ray_cluster, tmp_path: Path) -> None:
    from mlplatform.training.job import run_train

    cfg = compose("+mode=train", "+experiment=smoke", f"paths.root={tmp_path}", "logger=none",
                  "train.scaling.num_workers=2", "train.scaling.cpus_per_worker=0.5")
    out = run_train(cfg)
    meta = _registry(tmp_path).get(out["version"])
    assert meta["config"]["train"]["scaling"]["num_workers"] == 2
    history = meta["history"]
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    # Each epoch saw the whole training split, half on each worker (all-reduced counts).
    assert all(h["train/images"] == history[0]["train/images"] for h in history)
    assert out["metrics"]["test/acc"] > 2.5 * CHANCE
@pytest.mark.ray


def test_resumes_from_checkpoint_after_worker_dies(ray_cluster, tmp_path: Path) -> None:
    from mlplatform.training.job import run_train

    cfg = compose("+mode=train", "+experiment=smoke", f"paths.root={tmp_path}", "logger=none",
                  "train.chaos.kill_worker_at_epoch=2", "train.max_failures=1",
                  "train.early_stopping.patience=10")
    out = run_train(cfg)
    # Restarted from a checkpoint, not from scratch: the latest one Ray had registered when the
    # worker died (epoch 1's, or epoch 0's if the kill beat its registration).
    assert out["resumed_from_epoch"] in (1, 2)
    assert out["epochs_run"] == 8
    history = _registry(tmp_path).get(out["version"])["history"]
    assert [h["epoch"] for h in history] == list(range(8))
    assert glob.glob(str(tmp_path / "ray_results" / out["run"] / "chaos" / "chaos-killed-epoch-2"))
@pytest.mark.ray


def test_failure_beyond_max_failures_is_a_clean_job_failure(ray_cluster, tmp_path: Path) -> None:
    from mlplatform.errors import JobFailed
    from mlplatform.training.job import run_train

    cfg = compose("+mode=train", "+experiment=smoke", f"paths.root={tmp_path}", "logger=none",
                  "train.chaos.kill_worker_at_epoch=0", "train.max_failures=0")
    with pytest.raises(JobFailed) as info:
        run_train(cfg)
    assert "training failed" in str(info.value)
    assert not (tmp_path / "registry" / "species-classifier" / "v1" / "version.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_tune_two_trials_registers_the_best(ray_cluster, tmp_path: Path) -> None:
    from mlplatform.training.tune import run_tune

    cfg = compose("+mode=tune", "+experiment=smoke", f"paths.root={tmp_path}", "logger=none",
                  "train.tune.num_samples=2", "train.epochs=2")
    out = run_tune(cfg)
    assert out["num_trials"] == 2 and out["version"] == "v1"
    finished = [t["val/acc"] for t in out["trials"] if t["finished"]]
    meta = _registry(tmp_path).get("v1")
    assert meta["source"] == "tune" and meta["tune_best_config"] == out["best_config"]
    assert meta["history"][-1]["val/acc"] == pytest.approx(max(finished))  # the best finished trial
@pytest.mark.ray


def test_offline_predict_writes_parquet_with_the_extended_model(ray_cluster, trained, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from mlplatform.deployments.predict import run_predict

    root, summary = trained
    images = next((root / "datasets").iterdir())
    (tmp_path / "in" / "x").mkdir(parents=True)
    for f in sorted(images.glob("*/*.jpg"))[::5]:
        (tmp_path / "in" / "x" / f"{f.parent.name}__{f.name}").write_bytes(f.read_bytes())
    (tmp_path / "in" / "x" / "broken.jpg").write_bytes(b"not an image")
    out = run_predict(compose("+mode=predict", "+experiment=smoke", f"paths.root={root}",
                              f"predict.input={tmp_path / 'in'}", f"predict.output={tmp_path / 'out'}",
                              "predict.num_cpus_per_actor=0.5", "predict.top_k=3"))
    table = pq.read_table(str(tmp_path / "out")).to_pandas()
    assert out["images"] == len(table) == 8 * 60 // 5 + 1 and out["failed"] == 1
    assert set(table["version"]) == {summary["version"]}
    good = table[table["error"] == ""]
    assert all(len(json.loads(x)) == 3 for x in good["labels"])
    # The same extended model as serving: identical answers, image by image.
    from mlplatform.data.preprocess import decode
    from mlplatform.deployments.extended import ExtendedModel

    model = ExtendedModel(str(root / "registry"), "species-classifier", summary["version"], **accelerator())
    direct = [p.labels[0] for p in model.predict([decode(Path(x).read_bytes()) for x in good["path"]], 1)]
    assert list(good["top1"]) == direct
    truth = good["path"].map(lambda p: Path(p).name.split("__")[0])
    assert (good["top1"] == truth).mean() > 1.5 * CHANCE
@pytest.mark.ray


def test_inference_optimizations_keep_the_answers(trained) -> None:
    """Conv-BN folding and channels_last (the serving defaults) change speed, not answers."""
    from mlplatform.data import synthetic
    from mlplatform.deployments.extended import ExtendedModel

    root, summary = trained
    plain = ExtendedModel(str(root / "registry"), "species-classifier", summary["version"],
                          **accelerator(device="cpu", channels_last=False, fuse=False))
    fast = ExtendedModel(str(root / "registry"), "species-classifier", summary["version"],
                         **accelerator(device="cpu"))
    assert fast.channels_last and not plain.channels_last
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.model.modules()) > 0
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.model.modules()) == 0  # folded
    images = [synthetic.render(s, i, 64) for s in range(10) for i in range(4)]
    p0, p1 = plain.predict(images, 3), fast.predict(images, 3)
    assert [p.labels for p in p0] == [p.labels for p in p1]
    np.testing.assert_allclose(np.stack([p.probabilities for p in p0]), np.stack([p.probabilities for p in p1]),
                               atol=1e-4)
    np.testing.assert_allclose(np.stack([p.embedding for p in p0]), np.stack([p.embedding for p in p1]),
                               rtol=1e-3, atol=1e-4)


def _pointwise_net() -> torch.nn.Module:
    """1x1 convolutions on a 28 px map (where oneDNN is often faster), a 3x3 one, and a 1x1
    convolution off the forward path."""
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(3, 24, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(24, 96, 1),
                torch.nn.ReLU(), torch.nn.Conv2d(96, 24, 1, bias=False), torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten())
            self.unused = torch.nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    return Net().eval().to(memory_format=torch.channels_last)


@pytest.mark.parametrize("margin", [0.0, 0.9, 1e9])
def test_pointwise_tuning_changes_the_path_not_the_answers(margin: float) -> None:
    """margin 0: oneDNN never counts as faster, nothing is switched; 1e9: always, every 1x1
    convolution on the path runs on oneDNN at every batch size; 0.9: whatever this CPU says.
    The outputs match the untouched network at every batch size, above the largest tried too."""
    from mlplatform.deployments.extended import PointwiseConv, tune_pointwise_convs

    torch.manual_seed(0)
    ref = _pointwise_net()
    net = _pointwise_net()
    net.load_state_dict(ref.state_dict())
    example = torch.rand(1, 3, 56, 56).contiguous(memory_format=torch.channels_last)
    chosen = tune_pointwise_convs(net, example, batch_sizes=(1, 2, 4, 8), repeats=2, margin=margin)
    switched = {n for n, m in net.named_modules() if isinstance(m, PointwiseConv)}
    assert set(chosen) == switched <= {"body.2", "body.4"}  # never the 3x3 nor the one off the path
    assert isinstance(net.unused, torch.nn.Conv2d) and isinstance(net.body[0], torch.nn.Conv2d)
    if margin == 0.0:
        assert chosen == {}
    if margin == 1e9:
        assert chosen == {"body.2": [1, 2, 4, 8], "body.4": [1, 2, 4, 8]}
        assert all(net.body[2].onednn_at[1:]) and len(net.body[2].onednn_at) == 9
        onednn = net.body[2]._onednn
        net.body[2]._onednn = lambda x: calls.append(len(x)) or onednn(x)
    calls: list[int] = []
    with torch.inference_mode():
        for n in (1, 3, 8, 13):
            x = torch.rand(n, 3, 56, 56).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(net(x.contiguous()), ref(x.contiguous()), rtol=1e-4, atol=1e-5)
    assert calls == ([1, 1, 3, 3, 8, 8, 13, 13] if margin == 1e9 else [])


def test_pointwise_tuning_leaves_other_devices_and_dtypes_alone() -> None:
    from mlplatform.deployments.extended import tune_pointwise_convs

    net = _pointwise_net().double()
    assert tune_pointwise_convs(net, torch.rand(1, 3, 56, 56, dtype=torch.float64), margin=1e9) == {}
    assert isinstance(net.body[2], torch.nn.Conv2d)


def test_extended_model_tunes_a_torchvision_body_without_changing_answers(tmp_path, monkeypatch) -> None:
    """A registered mobilenet_v3_small (random weights, registered directly): with tuning
    forced to pick oneDNN everywhere, the fused fx body gets its 1x1 convolutions swapped
    and the answers match the untuned model; with compile on, nothing is tuned."""
    from functools import partial

    from mlplatform.data import synthetic
    from mlplatform.data.preprocess import PreprocessSpec
    from mlplatform.deployments import extended
    from mlplatform.models import torchvision_model

    labels = [f"s{i}" for i in range(10)]
    torch.manual_seed(0)
    model = torchvision_model("mobilenet_v3_small", num_classes=len(labels))
    spec = PreprocessSpec(96, 96, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", tuple(labels))
    meta = {"labels": labels, "preprocess": spec.to_dict(),
            "config": {"model": {"_target_": "mlplatform.models.torchvision_model", "name": "mobilenet_v3_small",
                                 "weights_path": None}}}
    version = Registry(str(tmp_path), "m").register(model.state_dict(), meta)
    monkeypatch.setattr(extended, "tune_pointwise_convs", partial(extended.tune_pointwise_convs, margin=1e9))
    plain = extended.ExtendedModel(str(tmp_path), "m", version, **accelerator(device="cpu", autotune=False))
    tuned = extended.ExtendedModel(str(tmp_path), "m", version, **accelerator(device="cpu"))
    swapped = [m for m in tuned.model.modules() if isinstance(m, extended.PointwiseConv)]
    assert plain.tuned == {} and len(tuned.tuned) == len(swapped) > 20
    images = [synthetic.render(s, i, 96) for s in range(5) for i in range(3)]
    for batch in (images[:1], images[:6], images):
        p0, p1 = plain.predict(batch, 3), tuned.predict(batch, 3)
        for key in ("probabilities", "embedding"):
            np.testing.assert_allclose(np.stack([getattr(p, key) for p in p0]),
                                       np.stack([getattr(p, key) for p in p1]), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # only the tuning decision is under test
    assert extended.ExtendedModel(str(tmp_path), "m", version, **accelerator(device="cpu", compile=True)).tuned == {}


def test_half_precision_folds_batchnorm_in_float32_before_the_cast() -> None:
    """fp16 serving (GPU) gets the float32 fold rounded once, not a fold computed in fp16
    (which changed about a quarter of mobilenet_v3_small's weights, and on an H100 moved
    probabilities up to 0.018 instead of 0.005). Checked on CPU: the weights, not a forward."""
    import copy

    from torch.fx.experimental.optimization import fuse

    from mlplatform.deployments.extended import prepare_for_inference
    from mlplatform.models import torchvision_model

    torch.manual_seed(0)
    model = torchvision_model("mobilenet_v3_small", num_classes=10).eval()
    for m in model.modules():  # BatchNorm statistics far from the identity, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.01, 3.0)
            m.running_mean.uniform_(-1.0, 1.0)
            m.weight.data.uniform_(0.5, 2.0)
    expected = fuse(copy.deepcopy(model.body)).half().state_dict()
    served = prepare_for_inference(copy.deepcopy(model), torch.device("cpu"), torch.float16, True, True, "v")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.body.modules())
    got = served.body.state_dict()
    assert got.keys() == expected.keys() and len(got) > 50
    for key, value in expected.items():
        assert got[key].dtype == torch.float16 and torch.equal(got[key], value), key
    assert served.head.weight.dtype == torch.float16
    # The float32 path is unchanged: same fold, no cast.
    plain = prepare_for_inference(copy.deepcopy(model), torch.device("cpu"), torch.float32, True, False, "v")
    for key, value in fuse(copy.deepcopy(model.body)).state_dict().items():
        assert torch.equal(plain.body.state_dict()[key], value), key
