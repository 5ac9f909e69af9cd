"""The shipped alerting rules, dashboards and scrape configs, on the real tools: `promtool`
checks and unit-tests the rules rendered from conf/, and a real Prometheus server scrapes a
live Serve app through Ray's metrics endpoint and fires the no-healthy-replica alert.

promtool and prometheus come from Debian's `prometheus` package (`make install-dev`)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import requests
import yaml

from mlplatform.deployments import manifests
from mlplatform.deployments.logs import LATENCY_BOUNDARIES

from .conftest import SERVE_PORT, compose, run_cli, wait_for

PACKAGE = Path(__file__).resolve().parents[1] / "mlplatform"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make install-dev` installs Debian's prometheus package",
                    pytrace=False)
    return path


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([_tool("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _rules(cfg) -> dict:
    return yaml.safe_load(manifests.render_rules(cfg))


def _alerts(rules: dict) -> dict[str, dict]:
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"]}


def test_rules_render_from_conf_and_pass_promtool_check(tmp_path: Path) -> None:
    cfg = compose("serve.request_timeout_s=4", "monitor.quality.min_accuracy=0.85")
    text = manifests.render_rules(cfg)
    assert "{{" not in re.sub(r"\{\{ [^}]*\}\}", "", text), "a placeholder was left unrendered"
    alerts = _alerts(yaml.safe_load(text))
    assert "> 2.0" in alerts["MLPLatencyP99High"]["expr"]  # half of serve.request_timeout_s
    assert "< 0.85" in alerts["MLPLiveAccuracyLow"]["expr"]
    assert alerts["MLPVersionNoHealthyReplica"]["for"] == "1m"
    (tmp_path / "rules.yaml").write_text(text)
    out = _promtool("check", "rules", "rules.yaml", cwd=tmp_path).stdout
    assert f"{len(alerts)} rules found" in out


def test_rules_and_dashboards_name_only_metrics_the_platform_exports() -> None:
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    defined = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(mlp_\w+)"', source))
    assert "mlp_version_healthy_replicas" in defined and "mlp_retrain_total" in defined
    text = manifests.render_rules(compose()) + "".join(manifests.dashboards().values())
    used = set(re.findall(r"ray_(mlp_\w+?)(?:_bucket|_sum|_count)?\b", text))
    assert used and used <= defined, f"not exported by any metric: {sorted(used - defined)}"
    for name, dash in manifests.dashboards().items():
        panels = json.loads(dash)["panels"]
        assert panels and all(t["expr"] for p in panels for t in p["targets"]), name


def _series(name: str, values: str, **labels: str) -> dict:
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def test_promtool_unit_tests_of_every_rule(tmp_path: Path) -> None:
    """Each rule fires on the series it is for and stays quiet beside it (Prometheus's own
    rule evaluation, one sample a minute). Annotations are checked by `promtool check rules`."""
    cfg = compose()
    values = manifests.rule_values(cfg)
    rules = _rules(cfg)
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    app = {"application": "species"}
    # Latency: a bucket past the p99 budget for app "slow", the first bucket for "species".
    above = next(b for b in LATENCY_BOUNDARIES if b >= values["p99_budget_s"])
    above_next = LATENCY_BOUNDARIES[LATENCY_BOUNDARIES.index(above) + 1]
    latency = []
    for le in [LATENCY_BOUNDARIES[0], above, above_next, "+Inf"]:
        for application, slow in (("slow", True), ("species", False)):
            fills = (le == "+Inf" or (le == above_next if slow else True))
            latency.append(_series("ray_mlp_request_latency_seconds_bucket", "0+60x20" if fills else "0x20",
                                   application=application, stage="total", le=str(le)))
    labels_ok, labels_few = values["min_labels"] + 5, max(values["min_labels"] - 5, 0)
    low_acc = values["min_accuracy"] / 2
    series = [
        _series("ray_mlp_version_healthy_replicas", "1 1 0x10", **app, version="v1", replica="ingress#a"),
        _series("ray_mlp_version_healthy_replicas", "1x12", **app, version="v2", replica="ingress#a"),
        # v1: 2 of 102 requests a minute are 500 (2%, budget 1%); v2: none.
        _series("ray_mlp_requests_total", "0+100x20", **app, version="v1", route="predict", status="200"),
        _series("ray_mlp_requests_total", "0+2x20", **app, version="v1", route="predict", status="500"),
        _series("ray_mlp_requests_total", "0+100x20", **app, version="v2", route="predict", status="200"),
        # v3: 10% 503s, v4: 10% 429s.
        _series("ray_mlp_requests_total", "0+90x20", **app, version="v3", route="predict", status="200"),
        _series("ray_mlp_requests_total", "0+10x20", **app, version="v3", route="predict", status="503"),
        _series("ray_mlp_requests_total", "0+90x20", **app, version="v4", route="predict", status="200"),
        _series("ray_mlp_requests_total", "0+10x20", **app, version="v4", route="predict", status="429"),
        *latency,
        # Drift: v1's counter appears at 5m (Ray exports a counter from its first increment).
        _series("ray_mlp_alerts_total", "_x5 1x15", **app, version="v1", kind="drift", detector="mmd"),
        _series("ray_mlp_alerts_total", "1x20", **app, version="v2", kind="quality", detector="live_accuracy"),
        _series("ray_mlp_live_accuracy", f"{low_acc}x20", **app, version="v1"),
        _series("ray_mlp_live_feedback_labels", f"{labels_ok}x20", **app, version="v1"),
        _series("ray_mlp_live_accuracy", f"{low_acc}x20", **app, version="v2"),
        _series("ray_mlp_live_feedback_labels", f"{labels_few}x20", **app, version="v2"),
        _series("ray_mlp_capture_dropped_total", "_x3 5 9 12x15", application="dropping", replica="a"),
        _series("ray_mlp_capture_buffered_records", "150x20", application="behind", replica="a"),
        _series("ray_mlp_capture_buffer_capacity", "200x20", application="behind", replica="a"),
        _series("ray_mlp_capture_buffered_records", "10x20", **app, replica="a"),
        _series("ray_mlp_capture_buffer_capacity", "200x20", **app, replica="a"),
        _series("ray_mlp_retrain_total", "_x4 1x15", **app, version="v1", outcome="failed"),
        _series("ray_mlp_retrain_total", "1x20", **app, version="v2", outcome="started"),
        # +mode=sync: a refused head from 2m until the next good commit at 12m; drift from 3m.
        _series("ray_mlp_gitops_sync_failing", "0 0 1x10 0x8", NodeAddress="head"),
        _series("ray_mlp_gitops_drift", "0x3 1x17", NodeAddress="head"),
    ]

    def crit(**labels: str) -> dict:
        return {"exp_labels": {"severity": "critical", **labels}}

    def warn(**labels: str) -> dict:
        return {"exp_labels": {"severity": "warning", **labels}}

    tests = [
        ("2m", "MLPVersionNoHealthyReplica", []),  # 0 since 2m: pending for its 1m
        ("4m", "MLPVersionNoHealthyReplica", [crit(**app, version="v1")]),
        ("4m", "MLPErrorRatioHigh", []),  # over budget, not yet for 5m
        # v3's 503s are 5xx too.
        ("12m", "MLPErrorRatioHigh", [crit(**app, version="v1"), crit(**app, version="v3")]),
        ("12m", "MLPUnavailable503", [crit(**app, version="v3")]),
        ("9m", "MLPRateLimited429", []),  # for 10m
        ("16m", "MLPRateLimited429", [warn(**app, version="v4")]),
        ("12m", "MLPLatencyP99High", [warn(application="slow")]),
        ("4m", "MLPDriftDetected", []),
        ("6m", "MLPDriftDetected", [warn(**app, version="v1", detector="mmd")]),
        ("10m", "MLPLiveAccuracyLow", [crit(**app, version="v1")]),
        ("5m", "MLPCaptureDropping", [crit(application="dropping")]),
        ("1m", "MLPCaptureFallingBehind", []),
        ("5m", "MLPCaptureFallingBehind", [warn(application="behind")]),
        ("3m", "MLPRetrainFailed", []),
        ("5m", "MLPRetrainFailed", [crit(**app)]),
        ("2m", "MLPGitOpsSyncFailing", []),  # pending for its 1m
        ("4m", "MLPGitOpsSyncFailing", [crit()]),
        ("14m", "MLPGitOpsSyncFailing", []),  # the next good commit applied
        ("6m", "MLPGitOpsDrift", []),  # pending for its 5m
        ("9m", "MLPGitOpsDrift", [warn()]),
    ]
    assert {t[1] for t in tests} == set(_alerts(rules)), "every shipped rule has a unit test"
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series,
                       "alert_rule_test": [{"eval_time": t, "alertname": a, "exp_alerts": exp}
                                           for t, a, exp in tests]}]}
    (tmp_path / "rules_test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    _promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)


def test_deploy_writes_rules_dashboards_and_scrape_configs(tmp_path: Path) -> None:
    cfg = compose("+mode=deploy", "+experiment=smoke", f"paths.root={tmp_path / 'root'}",
                  f"deploy.out_dir={tmp_path / 'out'}", "ray.metrics_export_port=9555", "serve.auth.required=false")
    # Only the monitoring part: run_deploy also resolves the registry's versions.
    paths = manifests.write_monitoring(cfg, str(tmp_path / "out"))
    mon = tmp_path / "out" / "monitoring"
    assert Path(paths["rules"]).read_text() == manifests.render_rules(cfg)
    local = yaml.safe_load((mon / "prometheus.yml").read_text())
    assert local["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9555"]
    assert local["rule_files"] == ["rules.yaml"]
    _promtool("check", "config", "prometheus.yml", cwd=mon)  # also loads and checks rules.yaml
    kube = yaml.safe_load((mon / "prometheus-kuberay.yml").read_text())
    job = kube["scrape_configs"][0]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [cfg.deploy.namespace]
    assert {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics",
            "action": "keep"} in job["relabel_configs"]
    assert json.loads((mon / "grafana" / "mlplatform_dashboard.json").read_text())["uid"] == "mlplatform-serving"
    # The RayService's pods serve their metrics on the port the scrape config keeps.
    svc = manifests.rayservice(cfg, {"applications": [{"deployments": []}]})
    cluster = svc["spec"]["rayClusterConfig"]
    for spec in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        port = int(spec["rayStartParams"]["metrics-export-port"])
        assert {"containerPort": port, "name": "metrics"} in spec["template"]["spec"]["containers"][0]["ports"]
    no_port = compose("ray.metrics_export_port=null")
    assert "file_sd_configs" in manifests.scrape_config(no_port, kuberay=False)["scrape_configs"][0]


def test_a_failed_retrain_is_reported_for_the_retrain_alert(tmp_path: Path) -> None:
    """What mlp_retrain_total{outcome="failed"} counts: a retrain command that exits non-zero
    (exit_status), and one that cannot start (the alert carries retrain_error, still logged)."""
    import sys

    from mlplatform.monitoring.alerts import AlertManager, read_alerts
    from mlplatform.triggers import exit_status

    def manager(command: list[str], sub: str) -> AlertManager:
        return AlertManager(str(tmp_path / sub / "alerts.jsonl"), "retrain", min_consecutive=1, cooldown_s=0,
                            retrain_cooldown_s=0, trigger_dir=str(tmp_path / sub / "triggers"),
                            retrain_command=command)

    alert = manager([sys.executable, "-c", "import sys; sys.exit(3)"], "exits").quality("v1", 0.1, 50, 0.7, 1.0)
    assert alert["pipeline_started"] and "retrain_error" not in alert
    codes: list[int] = []

    def ended() -> list[int]:
        code = exit_status(alert["retrain_log"])  # forgotten once read: keep it
        if code is not None:
            codes.append(code)
        return codes

    assert wait_for(ended, timeout=30, message="the retrain command never ended") == [3]
    missing = manager([str(tmp_path / "no-such-command")], "missing").quality("v1", 0.1, 50, 0.7, 1.0)
    assert missing["retrain_error"].startswith("FileNotFoundError")
    assert read_alerts(str(tmp_path / "missing" / "alerts.jsonl"))[0]["retrain_error"] == missing["retrain_error"]


# ----------------------------------------------------------------------------- live


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_version(ray_cluster, tmp_path_factory):
    """A trained model served as v1 alone, with one replica."""
    from mlplatform.deployments.serve_mode import deploy, undeploy
    from mlplatform.training.job import run_train

    root = tmp_path_factory.mktemp("alerts")
    run_train(compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none"))
    port = SERVE_PORT
    cfg = compose("+mode=serve", "+experiment=smoke", f"paths.root={root}", f"serve.port={port}",
                  "serve.deployment.num_cpus=0.25", "serve.deployment.min_replicas=1",
                  "serve.deployment.max_replicas=1", "monitor.enabled=false",
                  "serve.versions=[{ref: v1, role: stable, weight: 100}]")
    deploy(cfg)
    yield {"cfg": cfg, "url": f"http://127.0.0.1:{port}"}
    undeploy(cfg.serve.app_name)


@pytest.fixture
def prometheus(ray_cluster, tmp_path: Path):
    """A real Prometheus on loopback scraping this Ray's metrics endpoint every second with
    the shipped rules, the no-healthy-replica rule's `for` cut to 2 s."""
    from mlplatform import ray_compat

    metrics_port = ray_compat.metrics_export_port()
    assert metrics_port, "the test Ray exports no metrics endpoint"
    rules = _rules(compose())
    _alerts(rules)["MLPVersionNoHealthyReplica"]["for"] = "2s"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["rules.yaml"],
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    port = _free_port()
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(url + "/-/ready") is not None, timeout=30,
                 message=lambda: (tmp_path / "prometheus.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _get(url: str) -> dict | None:
    try:
        r = requests.get(url, timeout=5)
    except requests.RequestException:
        return None
    return (r.json() if "json" in r.headers.get("content-type", "") else {"ok": True}) if r.ok else None


def _query(prom: str, expr: str) -> list[dict]:
    body = _get(f"{prom}/api/v1/query?query={requests.utils.quote(expr)}")
    return body["data"]["result"] if body else []


def _kill_replicas(app: str, version_deployment: str) -> int:
    """Kill (no restart by Ray; Serve starts new ones) every live replica actor of one
    deployment; returns how many were killed."""
    import ray

    from mlplatform.deployments.serve_mode import replicas

    killed = 0
    for r in replicas(app).get(version_deployment, []):
        try:
            ray.kill(ray.get_actor(r["actor_name"], namespace="serve"), no_restart=True)
            killed += 1
        except ValueError:  # already gone
            pass
    return killed


@pytest.mark.ray
def test_deploy_mode_writes_monitoring_beside_the_serve_config(one_version, tmp_path: Path) -> None:
    root = one_version["cfg"].paths.root
    proc = run_cli("+mode=deploy", "+experiment=smoke", f"paths.root={root}", f"deploy.out_dir={tmp_path}",
                   "serve.request_timeout_s=3", "serve.auth.required=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "serve_config.yaml").exists() and (tmp_path / "rayservice.yaml").exists()
    mon = tmp_path / "monitoring"
    assert "> 1.5" in _alerts(yaml.safe_load((mon / "rules.yaml").read_text()))["MLPLatencyP99High"]["expr"]
    _promtool("check", "config", "prometheus.yml", cwd=mon)
    assert json.loads((mon / "grafana" / "mlplatform_dashboard.json").read_text())["panels"]


@pytest.mark.ray
@pytest.mark.slow
def test_prometheus_fires_no_healthy_replica_when_a_versions_replicas_die(one_version, prometheus) -> None:
    from mlplatform.deployments.serve_mode import replicas

    app = one_version["cfg"].serve.app_name
    healthy = f'max by (version) (ray_mlp_version_healthy_replicas{{application="{app}",version="v1"}})'
    # Ray's exporter publishes every few seconds: first the healthy value reaches Prometheus.
    wait_for(lambda: any(float(s["value"][1]) >= 1 for s in _query(prometheus, healthy)), timeout=60,
             interval=1, message="mlp_version_healthy_replicas{version=v1} >= 1 never reached Prometheus")
    # The ingress's capture writer exports its buffer (the capture alerts' denominator).
    capacity = f'ray_mlp_capture_buffer_capacity{{application="{app}"}}'
    wait_for(lambda: any(float(s["value"][1]) > 0 for s in _query(prometheus, capacity)), timeout=30,
             interval=1, message="mlp_capture_buffer_capacity never reached Prometheus")
    deployments = [d for d in replicas(app) if d != "Ingress" and "v1" in d]
    assert len(deployments) == 1, replicas(app)
    stop = threading.Event()

    def keep_killing() -> None:
        # Serve restarts a killed replica within seconds; the alert needs the version down
        # for a scrape, an evaluation and the rule's `for`.
        while not stop.is_set():
            _kill_replicas(app, deployments[0])
            stop.wait(0.3)

    killer = threading.Thread(target=keep_killing, daemon=True)
    killer.start()
    try:
        def firing() -> list[dict]:
            body = _get(prometheus + "/api/v1/alerts") or {"data": {"alerts": []}}
            return [a for a in body["data"]["alerts"] if a["labels"].get("alertname") == "MLPVersionNoHealthyReplica"
                    and a["state"] == "firing"]

        alerts = wait_for(firing, timeout=60, interval=1, message="MLPVersionNoHealthyReplica never fired")
    finally:
        stop.set()
        killer.join()
    assert alerts[0]["labels"]["version"] == "v1" and alerts[0]["labels"]["application"] == app
    assert alerts[0]["labels"]["severity"] == "critical"
    # Serve brings the version back and the alert resolves.
    wait_for(lambda: requests.get(one_version["url"] + "/v2/health/ready", timeout=5).ok, timeout=60,
             interval=1, message="v1 never came back")
