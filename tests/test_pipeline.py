"""Continuous training and GitOps rollout: the end-to-end loop on the smoke config with
real Ray and Serve, plus caching, the rollback of a bad canary and the alert-storm guard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
from scipy.stats import binom

from mlplatform.capture.store import CaptureStore
from mlplatform.capture.writer import CaptureWriter
from mlplatform.data import synthetic
from mlplatform.errors import ConfigError
from mlplatform.pipeline import gitops
from mlplatform.pipeline.rollout import analyze, run_rollout
from mlplatform.pipeline.triggers import consume_triggers, pipeline_lock
from mlplatform.triggers import start_guarded

from .conftest import ROOT, SERVE_PORT, compose, parallel, run_cli, wait_for
from .test_cache import assert_no_pickle

PORT = SERVE_PORT
URL = f"http://127.0.0.1:{PORT}"


def _git_repo(path: Path) -> Path:
    """A GitOps repository holding the serve file, as a team's config repo would."""
    (path / "conf" / "serve").mkdir(parents=True)
    shutil.copy(ROOT / "conf" / "serve" / "default.yaml", path / "conf" / "serve" / "default.yaml")
    for args in (["init", "-q", "-b", "main"], ["add", "."],
                 ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "serve config"]):
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)
    return path


def _serve(root: Path, *extra: str) -> list[str]:
    return ["+mode=serve", "+experiment=smoke", f"paths.root={root}", f"serve.port={PORT}", "logger=none",
            "serve.deployment.num_cpus=0.25", "serve.deployment.min_replicas=1", "serve.deployment.max_replicas=1",
            "monitor.window_size=32", "monitor.alerts.action=retrain", "monitor.alerts.cooldown_s=0", *extra]


def _predict(species: int, index: int, drifted: bool) -> dict:
    kinds = ["brightness", "blur", "noise", "color_cast", "background"] if drifted else []
    data = synthetic.encode_jpeg(synthetic.render(species, index, 32, 0, kinds, 0.6 if drifted else 0.0))
    r = requests.post(URL + "/predict", data=data, headers={"content-type": "image/jpeg"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _traffic(n: int, start: int, drifted: bool = False, feedback: bool = False, threads: int = 4) -> list[dict]:
    labels = synthetic.species_names(8)
    out: list[dict] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        for i in range(k, n, threads):
            body = _predict(i % 8, start + i, drifted)
            if feedback:
                r = requests.post(URL + "/feedback", json={"request_id": body["request_id"], "label": labels[i % 8]},
                                  timeout=30)
                assert r.status_code == 202, r.text
            with lock:
                out.append(body)

    parallel(work, threads)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_end_to_end_drift_retrain_canary_promote(ray_cluster, tmp_path: Path) -> None:
    from mlplatform.deployments.serve_mode import deploy, undeploy
    from mlplatform.pipeline.run import run_pipeline
    from mlplatform.registry.store import Registry
    from mlplatform.training.job import run_train

    root, repo = tmp_path / "root", _git_repo(tmp_path / "repo")
    # 1. Train v1 and serve it.
    v1 = run_train(compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none"))["version"]
    deploy(compose(*_serve(root)))
    try:
        # 2. Drifted traffic with feedback: an alert fires (and, with action=retrain, a trigger).
        labelled = {b["request_id"] for b in _traffic(96, 5000, drifted=True, feedback=True)}
        wait_for(lambda: [a for a in requests.get(URL + "/monitoring", timeout=30).json()["alerts"]
                          if a["kind"] == "drift"], 90, 0.5, "no drift alert")
        assert list((root / "triggers").glob("*.json"))
        store = CaptureStore(str(root / "capture"))  # what the pipeline trains on, flushed
        wait_for(lambda: labelled <= {j["request_id"] for j in store.labelled()}, 30, 0.3,
                 "the labelled traffic was not all captured")

        # 3. The pipeline retrains on base + captured data; v2 is blessed; the canary is proposed.
        # The smoke test split has about 6 images per species: one image moves a species' recall
        # by 0.17 and the accuracy by 0.02, so the gate's comparison with v1 is loosened here.
        pcfg = compose("+mode=pipeline", "+experiment=smoke", f"paths.root={root}", "logger=none",
                       f"gitops.repo={repo}", "pipeline.canary_weight=50", "train.gate.min_gain=-0.1",
                       "train.gate.max_recall_drop=1.0")
        out = run_pipeline(pcfg)
        assert out["blessed"] and out["version"] != v1 and out["proposed"], out
        gate = json.loads(Path(out["lineage"]).read_text())["steps"][5]["outputs"]
        drifted = gate["slices"]["drifted"]  # what retraining on captured drifted data is for
        assert drifted["candidate"]["acc"] > drifted["production"]["acc"], drifted
        assert out["triggers"] >= 1  # the alert's trigger files were consumed by this run
        v2 = out["version"]
        steps = {s["step"]: s["status"] for s in out["steps"]}
        assert steps["train"] == "ran" and list(steps) == list(pcfg.pipeline.steps)
        lineage = Registry(str(root / "registry"), "species-classifier").get(v2)["pipeline"]
        assert lineage["data_snapshot"] and lineage["code"] and lineage["config_hash"] and lineage["steps"]["train"]
        log = subprocess.run(["git", "log", "-1", "--format=%B", out["branch"]], cwd=repo, capture_output=True,
                             text=True, check=True).stdout
        assert f"Canary {v2} at 50%" in log and "Gate checks" in log
        versions = gitops.load_versions(out["proposal"])
        assert versions == [{"ref": v1, "role": "stable", "weight": 50}, {"ref": v2, "role": "canary", "weight": 50}]

        # 4. Apply the proposal (what merging the pull request and +mode=serve do); observe the split.
        flat = ", ".join(f"{{ref: {v['ref']}, role: {v['role']}, weight: {v['weight']}}}" for v in versions)
        deploy(compose(*_serve(root), f"serve.versions=[{flat}]"))
        served = Counter(b["version"] for b in _traffic(200, 20_000))
        lo, hi = binom.ppf(0.0005, 200, 0.5), binom.ppf(0.9995, 200, 0.5)
        assert set(served) == {v1, v2} and lo <= served[v2] <= hi, served

        # 5. Canary analysis promotes v2; v1 is retired and production moves.
        rcfg = compose("+mode=rollout", *_serve(root, f"serve.versions=[{flat}]")[1:], f"gitops.repo={repo}",
                       "rollout.apply=true", "rollout.window=1h", "rollout.min_requests=50",
                       "rollout.max_looks=1", "rollout.error_margin=0.05", "rollout.latency_margin=2",
                       "rollout.false_rollback=0.001", "rollout.steps=[50,100]")
        r = run_rollout(rcfg)
        assert r["decision"] == "promote" and r["applied"], r
        assert r["aliases"]["production"] == v2 and r["aliases"]["previous"] == v1
        models = requests.get(URL + "/models", timeout=30).json()["versions"]
        assert [(m["version"], m["weight"]) for m in models] == [(v2, 100)]
        assert {b["version"] for b in _traffic(20, 40_000)} == {v2}
    finally:
        undeploy("species")


# ----------------------------------------------------------------------------- caching (CLI)


@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_twice_trains_once(tmp_path: Path) -> None:
    args = ("+mode=pipeline", "+experiment=smoke", f"paths.root={tmp_path}", "logger=none", "train.epochs=2")
    first = run_cli(*args, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    one = json.loads(first.stdout.strip().splitlines()[-1])
    assert one["trained"] and one["version"] == "v1" and not one["all_cached"]
    second = run_cli(*args, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    two = json.loads(second.stdout.strip().splitlines()[-1])
    assert two["all_cached"] and not two["trained"] and two["version"] == "v1"
    assert [s["status"] for s in two["steps"]] == ["cached"] * 8
    lineage = json.loads(Path(two["lineage"]).read_text())
    assert [s["step"] for s in lineage["steps"]] == [s["step"] for s in one["steps"]]
    # The terminal: each step says when it runs and ends, or that it came from the cache.
    shown = [line.split()[2:4] for line in first.stderr.splitlines() if line.startswith("step ")]
    assert shown == [w for s in one["steps"] for w in ([[s["step"], "cached"]] if s["status"] == "cached"
                                                     else [[s["step"], "running"], [s["step"], "done"]])]
    shown = [line.split()[2:4] for line in second.stderr.splitlines() if line.startswith("step ")]
    assert shown == [[s["step"], "cached"] for s in two["steps"]]
    assert_no_pickle(tmp_path / "pipeline" / "cache")


# ----------------------------------------------------------------------------- rollout analysis


class _R:  # one look, wide margins: about 100 requests per version can show non-inferiority
    min_requests, min_feedback, min_shadow_pairs, min_agreement = 50, 20, 50, 0.8
    false_promotion, false_rollback, max_looks = 0.05, 0.05, 1
    error_margin, latency_margin, accuracy_margin = 0.05, 1.5, 0.15


def _stats(version: str, requests_: int, errors: int = 0, p95: float = 10.0, fb: int = 0, acc: float | None = None):
    # Latencies spread evenly up to about p95 / 0.95: the slowest request is not an outlier.
    lat = np.linspace(p95 / 20, p95 / 0.95, requests_ - errors)
    return {"version": version, "requests": requests_, "errors": errors, "error_rate": errors / requests_,
            "latency_p50_ms": p95 / 2, "latency_p95_ms": p95, "latencies_ms": lat, "feedback": fb,
            "feedback_correct": round((acc or 0.0) * fb), "feedback_accuracy": acc}


@pytest.mark.parametrize("canary,decision", [
    (_stats("v2", 100), "advance"),
    (_stats("v2", 20), "hold"),
    (_stats("v2", 100, errors=10), "rollback"),
    (_stats("v2", 100, p95=40.0), "rollback"),
    (_stats("v2", 100, fb=30, acc=0.5), "rollback"),
    (_stats("v2", 100, fb=30, acc=0.93), "advance"),
])
def test_canary_analysis_decides(canary: dict, decision: str) -> None:
    stable = _stats("v1", 500, errors=1, fb=40, acc=0.95)
    assert analyze(stable, canary, _R())["decision"] == decision


def test_a_bad_canary_is_rolled_back_in_gitops_form(tmp_path: Path) -> None:
    """Live captured data where the canary fails 14% of requests: the proposal drops it."""
    import numpy as np
    import torch

    from mlplatform.registry.store import Registry

    reg = Registry(str(tmp_path / "registry"), "species-classifier")
    for _ in range(2):
        reg.register({"w": torch.zeros(2)}, {"labels": ["a", "b"], "metrics": {}})
    w = CaptureWriter(str(tmp_path / "capture"), flush_interval_s=3600, sample_images=0.0)
    now = time.time()
    for i in range(200):
        version, failed = ("v2", i % 7 == 0) if i % 2 else ("v1", False)
        w.add_prediction({"request_id": f"r{i}", "ts": now - 60 + i * 0.1, "version": version,
                          "role": "canary" if version == "v2" else "stable", "route": "predict",
                          "labels": [] if failed else ["a"], "scores": [] if failed else [0.9],
                          "top1": None if failed else "a", "top1_index": -1 if failed else 0,
                          "latency_ms": 5.0, "embedding": None if failed else np.zeros(2, np.float32),
                          "status": 500 if failed else 200})
    w.close()
    repo = _git_repo(tmp_path / "repo")
    cfg = compose("+mode=rollout", f"paths.root={tmp_path}", f"gitops.repo={repo}", "rollout.min_requests=50",
                  "serve.versions=[{ref: v1, role: stable, weight: 90}, {ref: v2, role: canary, weight: 10}]")
    out = run_rollout(cfg)
    assert out["decision"] == "rollback" and not out["applied"], out
    assert out["canary"]["errors"] == 14 and out["stable"]["errors"] == 0
    failed = [c["check"] for c in out["checks"] if c["passed"] is False]
    assert failed == ["error_rate"]
    assert gitops.load_versions(out["proposal"]["serve_file"]) == [{"ref": "v1", "role": "stable", "weight": 100}]
    text = subprocess.run(["git", "show", f"{out['proposal']['branch']}:conf/serve/default.yaml"], cwd=repo,
                          capture_output=True, text=True, check=True).stdout
    assert "role: canary" not in text and "# What production serves" in text  # comments survive
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                          text=True).stdout == ""  # the checkout itself is untouched


# ----------------------------------------------------------------------------- triggers


def _running(needle: str) -> list[int]:
    """Live processes whose command line contains `needle` (a finished one's is empty)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_text(errors="ignore"):
                out.append(int(pid))
        except OSError:
            continue
    return out


def test_an_alert_storm_starts_one_pipeline(tmp_path: Path) -> None:
    from mlplatform.monitoring.alerts import AlertManager
    from mlplatform.monitoring.detectors import DriftResult
    from mlplatform.monitoring.windows import WindowResult

    marker = tmp_path / "started.txt"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('run\\n')"]
    am = AlertManager(str(tmp_path / "alerts.jsonl"), "retrain", min_consecutive=1, cooldown_s=0,
                      trigger_dir=str(tmp_path / "triggers"), retrain_command=cmd, retrain_cooldown_s=600)
    for i in range(30):  # a storm: every detector of every window alerts
        results = [DriftResult(d, "embedding", True, 0.0, 1.0, 0.05, 32) for d in ("mmd", "ks", "chi2")]
        am.window(WindowResult("v1", i, 1000.0 + i, 1000.0 + i, 32, results))
    assert sum(a.get("pipeline_started", False) for a in am.raised) == 1
    # Every command a start launched has run (the storm is over: nothing starts later).
    wait_for(lambda: marker.exists() and not _running(str(marker)), 10, 0.1, "the started command did not finish")
    assert marker.read_text() == "run\n"  # one start for 90 alerts
    triggers = consume_triggers(str(tmp_path / "triggers"), "run-1")
    assert len(triggers) == 90 and not list((tmp_path / "triggers").glob("*-drift-*.json"))


def test_no_start_while_a_pipeline_runs(tmp_path: Path) -> None:
    trig = str(tmp_path)
    with pipeline_lock(trig, "run-a"):
        assert not start_guarded(trig, [sys.executable, "-c", "pass"], cooldown_s=0)
    assert start_guarded(trig, [sys.executable, "-c", "pass"], cooldown_s=0)
    assert not os.path.exists(os.path.join(trig, "pipeline.lock"))


def test_a_triggered_retrain_writes_its_output_to_the_log_its_alert_names(tmp_path: Path) -> None:
    from mlplatform.monitoring.alerts import AlertManager, read_alerts
    from mlplatform.monitoring.detectors import DriftResult
    from mlplatform.monitoring.windows import WindowResult

    cmd = [sys.executable, "-c", "import sys; print('retrain out'); print('retrain err', file=sys.stderr); sys.exit(3)"]
    am = AlertManager(str(tmp_path / "alerts.jsonl"), "retrain", min_consecutive=1, cooldown_s=0,
                      trigger_dir=str(tmp_path / "triggers"), retrain_command=cmd, retrain_cooldown_s=600)
    for i in range(2):  # the second alert falls within the retrain cooldown: nothing starts
        am.window(WindowResult("v1", i, 1000.0 + i, 1000.0 + i, 32,
                               [DriftResult("mmd", "embedding", True, 0.0, 1.0, 0.05, 32)]))
    first, second = read_alerts(str(tmp_path / "alerts.jsonl"))  # the alerts log, as written
    assert first["pipeline_started"] is True and first["retrain_log"] == am.raised[0]["retrain_log"]
    assert second["pipeline_started"] is False and second["retrain_log"] is None
    log = Path(first["retrain_log"])
    assert log.parent == tmp_path / "triggers"
    deadline = time.time() + 30
    while time.time() < deadline and "retrain err" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    text = log.read_text()
    assert "retrain out" in text and "retrain err" in text


def test_a_failed_pipeline_run_leaves_its_triggers_for_the_next(tmp_path: Path) -> None:
    """Only a run that finishes consumes the triggers it answers (no Ray: a snapshot-only run)."""
    from mlplatform.errors import JobFailed
    from mlplatform.pipeline.run import run_pipeline
    from mlplatform.triggers import pending, write_trigger

    trig = tmp_path / "triggers"
    for i in range(3):
        write_trigger(str(trig), {"ts": 1000.0 + i, "version": "v1", "kind": "drift", "detector": "mmd"})
    base = ["+mode=pipeline", f"paths.root={tmp_path}", "logger=none", "pipeline.steps=[snapshot]"]
    with pytest.raises(JobFailed, match="no labelled production image"):  # and no base dataset
        run_pipeline(compose(*base, "data.captured.base=none"))
    assert len(pending(str(trig))) == 3 and not (trig / "consumed").exists()

    folder = tmp_path / "base"
    for species in ("a", "b"):
        (folder / species).mkdir(parents=True)
        (folder / species / "1.png").write_bytes(b"listed, not decoded, by the snapshot step")
    out = run_pipeline(compose(*base, "data.captured.base=folder", f"data.captured.base_root={folder}"))
    assert out["triggers"] == 3 and pending(str(trig)) == []
    assert len(list((trig / "consumed" / out["run_id"]).glob("*.json"))) == 3
    assert len(json.loads(Path(out["lineage"]).read_text())["triggers"]) == 3


@pytest.mark.parametrize("override,key", [
    ("pipeline.steps=[snapshot,train]", "pipeline.steps"),
    ("pipeline.steps=[snapshot,validate,split,trian]", "pipeline.steps"),
    ("pipeline.canary_weight=100", "pipeline.canary_weight"),
    ("rollout.steps=[50,10,100]", "rollout.steps"),
    ("rollout.window=soon", "rollout.window"),
    ("pipeline.evaluate.slices=[everything]", "pipeline.evaluate.slices"),
])
def test_pipeline_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose("+mode=pipeline", override)
    assert info.value.key == key


def test_cronjob_example_is_a_valid_manifest() -> None:
    import yaml

    doc = yaml.safe_load((ROOT / "docs" / "pipeline-cronjob.yaml").read_text())
    assert doc["kind"] == "CronJob" and len(doc["spec"]["schedule"].split()) == 5
    container = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:4] == ["python", "-m", "mlplatform", "+mode=pipeline"]  # the image's entry
    compose(*container["command"][3:])  # the overrides it passes are a valid config


@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_with_tune_registers_the_best_trial(ray_cluster, tmp_path: Path) -> None:
    from mlplatform.pipeline.run import run_pipeline
    from mlplatform.registry.store import Registry

    cfg = compose("+mode=pipeline", "+experiment=smoke", f"paths.root={tmp_path}", "logger=none",
                  "+train/tune=asha", "train.tune.num_samples=2", "train.epochs=2",
                  # No early stop: a trial ASHA stops mid-run can leave its Ray Train workers
                  # holding CPUs on the shared test cluster (docs/data-and-training.md).
                  "train.tune.scheduler.grace_period=3",
                  "pipeline.steps=[snapshot,validate,split,tune,evaluate,gate,register]")
    out = run_pipeline(cfg)
    assert [s["step"] for s in out["steps"]] == list(cfg.pipeline.steps) and out["trained"]
    lineage = json.loads(Path(out["lineage"]).read_text())
    tune = next(s for s in lineage["steps"] if s["step"] == "tune")
    assert tune["outputs"]["num_trials"] == 2 and tune["outputs"]["tune_best_config"]
    meta = Registry(str(tmp_path / "registry"), "species-classifier").get(out["version"])
    assert meta["source"] == "pipeline" and meta["pipeline"]["steps"]["tune"] == meta["pipeline"]["train_key"]
