"""`+mode=deploy`: write, without starting anything, what a Kubernetes cluster with KubeRay
needs to run conf/serve and the platform's jobs (docs/cluster.md):

- `serve_config.yaml`: the Ray Serve config for `serve deploy` (Ray's own ServeDeploySchema),
  its paths the cluster's: under deploy.storage.mount_path, where paths.root is here;
- `rayservice.yaml`: a KubeRay RayService with that config, autoscaling and GPU settings;
- `rayjob-pipeline.yaml`, `rayjob-train.yaml`: KubeRay RayJobs that run
  `python -m mlplatform +mode=pipeline|train` on a cluster of their own;
- `pvc.yaml`: the ReadWriteMany PersistentVolumeClaim that every pod mounts at mount_path;
- `monitoring/`: Prometheus alerting rules rendered from conf/ (`rules.yaml`), scrape configs
  for Ray's metrics endpoint (`prometheus.yml` for a local Ray, `prometheus-kuberay.yml` for
  the RayService's pods) and Grafana dashboards (`grafana/*.json`); docs/operations.md.

Every pod runs the platform's image, deploy.image: the repository's Dockerfile (a Ray image plus
this wheel); the summary's `docker_build` is the command that builds it.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from importlib import resources
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from ray.serve.schema import ServeDeploySchema

from mlplatform import storage
from mlplatform.deployments.serve_mode import deploy_schema, resolve_settings
from mlplatform.errors import ConfigError
from mlplatform.raycluster import serve_env

# The modes a RayJob runs on the cluster (rayjob-<mode>.yaml).
JOB_MODES = ("pipeline", "train")
# Read by conf/paths/default.yaml: a mode run in a pod writes to the shared volume by default.
PATHS_ROOT_ENV = "MLP_PATHS_ROOT"
SHARED_VOLUME = "shared"


class _Dumper(yaml.SafeDumper):
    """Plain YAML: a dict used twice (limits and requests) is written twice, not as an alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False)


def storage_roots(cfg: DictConfig) -> tuple[str, str]:
    """(paths.root as this process sees it, the same volume's path in the cluster's pods)."""
    return storage.resolve_root(cfg.paths.root), str(cfg.deploy.storage.mount_path).rstrip("/")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _served_paths(cfg: DictConfig) -> list[str]:
    """The config keys whose paths the served application reads or writes."""
    keys = ["registry.root", "monitor.capture.root"]
    if cfg.monitor.enabled:
        keys += ["monitor.alerts.path", "monitor.alerts.trigger_dir"]
    return keys


def to_cluster(obj: Any, local_root: str, mount_path: str) -> Any:
    """obj with every path under local_root moved under mount_path (strings in lists and dicts)."""
    if isinstance(obj, dict):
        return {k: to_cluster(v, local_root, mount_path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cluster(v, local_root, mount_path) for v in obj]
    if isinstance(obj, str) and _under(obj, local_root):
        return mount_path + obj[len(local_root):]
    return obj


def serve_config(cfg: DictConfig) -> dict[str, Any]:
    """The Serve config for the cluster. The registry is read here, at paths.root, to pin
    versions and verify checksums; the config names the same files under mount_path, so
    paths.root here must be the cluster's volume (mounted here, or +mode=deploy run in a pod)."""
    local_root, mount_path = storage_roots(cfg)
    for key in _served_paths(cfg):
        value = storage.resolve_root(str(OmegaConf.select(cfg, key)))
        if not _under(value, local_root):
            raise ConfigError(key, value, f"not under paths.root ({local_root}): the cluster's pods see only "
                              f"the volume deploy.storage at {mount_path}, which is paths.root here")
    # The keys' secrets stay in the cluster: the ingress reads the variables or files that
    # rayservice() wires from the Kubernetes Secret (serve.auth.k8s_secret).
    schema = deploy_schema(cfg, resolve_settings(cfg, read_secrets=False))
    data = json.loads(schema.model_dump_json(exclude_unset=True))
    for app in data["applications"]:
        # The application's settings hold the storage paths; the keys' secret files (in the
        # ingress's user_config) are where the RayService mounts the Secret, as given.
        app["args"]["settings"] = to_cluster(app["args"]["settings"], local_root, mount_path)
    ServeDeploySchema.model_validate(data)  # the file must round-trip through Ray's schema
    return data


def _gpus(settings_cfg: dict[str, Any]) -> float:
    # The ingress has no ray_actor_options: no GPU.
    return max([float((d.get("ray_actor_options") or {}).get("num_gpus") or 0)
                for app in settings_cfg["applications"] for d in app.get("deployments", [])] or [0.0])


def secret_wiring(cfg: DictConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """serve.auth.keys from the Secret serve.auth.k8s_secret (one entry per key id): env from
    secretKeyRef for secret_env keys, a read-only volume per folder for secret_file keys.
    Returns (env, volumes, volumeMounts) for every Ray container: the ingress runs on any."""
    secret = cfg.serve.auth.k8s_secret
    env, folders = [], {}
    for k in cfg.serve.auth["keys"]:
        if k.secret_env:
            env.append({"name": k.secret_env, "valueFrom": {"secretKeyRef": {"name": secret, "key": k.id}}})
        else:
            folder, _, name = str(k.secret_file).rpartition("/")
            folders.setdefault(folder or "/", []).append({"key": k.id, "path": name})
    volumes = [{"name": f"api-keys-{i}", "secret": {"secretName": secret, "items": items}}
               for i, items in enumerate(folders.values())]
    mounts = [{"name": f"api-keys-{i}", "mountPath": folder, "readOnly": True} for i, folder in enumerate(folders)]
    return env, volumes, mounts


def pvc(cfg: DictConfig) -> dict[str, Any]:
    """The shared volume: ReadWriteMany, so the head and every worker read and write it."""
    s = cfg.deploy.storage
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": str(s.capacity)}}}
    if s.storage_class:
        spec["storageClassName"] = s.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": s.claim, "namespace": cfg.deploy.namespace,
                         "labels": {"app.kubernetes.io/part-of": "mlplatform"}},
            "spec": spec}


def ray_cluster_spec(cfg: DictConfig, gpus: float, serve: bool) -> dict[str, Any]:
    """A KubeRay RayClusterSpec: a head with 0 CPUs (drivers and Serve's controller, no
    work), autoscaled workers, every pod running deploy.image with the shared volume at
    mount_path. serve: the RayService's (Serve's env, the API keys' Secret, Serve's port)."""
    d = cfg.deploy
    shared_mount = {"name": SHARED_VOLUME, "mountPath": str(d.storage.mount_path)}
    volumes: list[dict[str, Any]] = [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": d.storage.claim}}]
    mounts = [shared_mount]
    env: list[dict[str, Any]] = []
    if serve:
        # Serve reads its mode at process start: every Ray container carries it.
        env += [{"name": k, "value": v} for k, v in serve_env(bool(cfg.ray.serve_high_throughput)).items()]
        key_env, key_volumes, key_mounts = secret_wiring(cfg)
        env += key_env
        volumes += key_volumes
        mounts += key_mounts
    # Drivers run on the head (a RayJob's entrypoint, `kubectl exec ... python -m mlplatform`):
    # their paths.root is the volume.
    head_env = [{"name": PATHS_ROOT_ENV, "value": str(d.storage.mount_path)}, *env]
    worker_limits: dict[str, Any] = {"cpu": str(d.worker_cpus), "memory": d.worker_memory}
    if gpus > 0:
        worker_limits["nvidia.com/gpu"] = str(max(1, d.worker_gpus))
    head_limits = {"cpu": str(d.head_cpus), "memory": d.head_memory}
    head_ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"},
                  *([{"containerPort": 8000, "name": "serve"}] if serve else []),
                  {"containerPort": KUBERAY_METRICS_PORT, "name": "metrics"}]
    worker_pod: dict[str, Any] = {
        "containers": [{"name": "ray-worker", "image": d.image,
                        "resources": {"limits": worker_limits, "requests": worker_limits},
                        "ports": [{"containerPort": KUBERAY_METRICS_PORT, "name": "metrics"}],
                        **({"env": env} if env else {}), "volumeMounts": mounts}],
        "volumes": volumes}
    if gpus > 0:
        worker_pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "rayVersion": "2.60.0",
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0",
                               "metrics-export-port": str(KUBERAY_METRICS_PORT)},
            "template": {"spec": {"containers": [{
                "name": "ray-head", "image": d.image,
                "resources": {"limits": head_limits, "requests": head_limits},
                "ports": head_ports, "env": head_env, "volumeMounts": mounts}], "volumes": volumes}},
        },
        "workerGroupSpecs": [{
            "groupName": "gpu-workers" if gpus > 0 else "cpu-workers",
            "replicas": d.min_workers, "minReplicas": d.min_workers, "maxReplicas": d.max_workers,
            "rayStartParams": {"metrics-export-port": str(KUBERAY_METRICS_PORT)},
            "template": {"spec": worker_pod},
        }],
    }


def _metadata(cfg: DictConfig, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": cfg.deploy.namespace, "labels": {"app.kubernetes.io/part-of": "mlplatform"}}


def rayservice(cfg: DictConfig, serve_cfg: dict[str, Any]) -> dict[str, Any]:
    cluster = ray_cluster_spec(cfg, _gpus(serve_cfg), serve=True)
    if cfg.deploy.sync:
        add_sync_sidecar(cfg, cluster)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(cfg, cfg.serve.app_name),
        "spec": {"serveConfigV2": dump(serve_cfg), "rayClusterConfig": cluster},
    }


SYNC_CONTAINER = "gitops-sync"
# The reconciler polls git and composes YAML: a fraction of a core; its imports (Ray, torch
# for the registry's checksums) need about a GiB.
SYNC_RESOURCES = {"requests": {"cpu": "100m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}


def sync_command(cfg: DictConfig) -> list[str]:
    """The sidecar's `+mode=sync`: a driver on the head node, composing each commit as the
    cluster serves it (Serve bound to deploy.serve_host), plus gitops.overrides."""
    g = cfg.gitops
    overrides = [f"serve.host={cfg.deploy.serve_host}", *map(str, g.overrides)]
    quoted = ", ".join("'" + o.replace("'", "\\'") + "'" for o in overrides)  # Hydra's quoted strings
    return ["python", "-m", "mlplatform", "+mode=sync", "ray.address=auto", f"gitops.repo={g.repo}",
            f"gitops.branch={g.branch}", f"gitops.conf_dir={g.conf_dir}", f"gitops.interval_s={g.interval_s}",
            f"gitops.self_heal={str(bool(g.self_heal)).lower()}", f"gitops.overrides=[{quoted}]"]


def add_sync_sidecar(cfg: DictConfig, cluster: dict[str, Any]) -> None:
    """deploy.sync: `+mode=sync` in a container beside ray-head, with its env and volumes.
    A driver needs its node's Ray sockets and session files: both containers mount one
    emptyDir at /tmp/ray, and the pod's network is shared (ray.address=auto finds the head).
    Until the head is up the sidecar exits and Kubernetes restarts it."""
    pod = cluster["headGroupSpec"]["template"]["spec"]
    head = pod["containers"][0]
    ray_tmp = {"name": "ray-tmp", "mountPath": "/tmp/ray"}
    pod["volumes"] = [*pod["volumes"], {"name": "ray-tmp", "emptyDir": {}}]  # the list is the workers' too
    head["volumeMounts"] = [*head["volumeMounts"], ray_tmp]
    pod["containers"] = [*pod["containers"], {
        "name": SYNC_CONTAINER, "image": head["image"], "command": sync_command(cfg),
        "resources": SYNC_RESOURCES, "env": head["env"], "volumeMounts": head["volumeMounts"]}]


def _train_gpus(cfg: DictConfig) -> float:
    s = cfg.train.scaling
    return float(s.gpus_per_worker or 1) if s.use_gpu else 0.0


def rayjob(cfg: DictConfig, mode: str) -> dict[str, Any]:
    """`python -m mlplatform +mode=<mode>` on a cluster of its own, deleted when the job ends.
    The driver joins it through RAY_ADDRESS, which Ray sets (ray.address stays null), and
    writes under mount_path (MLP_PATHS_ROOT): the registry the RayService serves from. The
    pipeline reads conf/serve from, and proposes to, the clone at deploy.gitops_repo."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(cfg, f"{cfg.serve.app_name}-{mode}"),
        "spec": {"entrypoint": shlex.join(["python", "-m", "mlplatform", f"+mode={mode}",
                                           *([f"gitops.repo={cfg.deploy.gitops_repo}"] if mode == "pipeline" else [])]),
                 "shutdownAfterJobFinishes": True,
                 "rayClusterSpec": ray_cluster_spec(cfg, _train_gpus(cfg), serve=False)},
    }


def docker_build(cfg: DictConfig, gpu: bool) -> str:
    """The command, run at the repository root after `python -m build --wheel`, that builds deploy.image."""
    base = cfg.deploy.base_image_gpu if gpu else cfg.deploy.base_image
    return shlex.join(["docker", "build", "--build-arg", f"BASE_IMAGE={base}", "-t", str(cfg.deploy.image), "."])


# Ray's metrics port in the RayService's pods (Ray's default, set explicitly on every node).
KUBERAY_METRICS_PORT = 8080


def _asset(*parts: str) -> str:
    return resources.files("mlplatform.deploy_assets").joinpath(*parts).read_text(encoding="utf-8")


def rule_values(cfg: DictConfig) -> dict[str, Any]:
    """The conf/ values the alerting rules are rendered with."""
    m = cfg.monitor
    return {"request_timeout_s": float(cfg.serve.request_timeout_s),
            # A p99 at half the timeout leaves little headroom before requests become 504s.
            "p99_budget_s": float(cfg.serve.request_timeout_s) / 2,
            "min_accuracy": float(m.quality.min_accuracy), "min_labels": int(m.quality.min_labels),
            "min_consecutive": int(m.alerts.min_consecutive), "cooldown_s": float(m.alerts.cooldown_s)}


def render_rules(cfg: DictConfig) -> str:
    """deploy_assets/prometheus/rules.yaml with each `{{name}}` filled from conf/. Prometheus's
    own `{{ $labels.x }}` templates (with a space and a `$`) are left for Prometheus."""
    values = rule_values(cfg)

    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"rules.yaml names {{{{{match.group(1)}}}}}, which rule_values does not define")
        return str(values[match.group(1)])

    text = re.sub(r"\{\{(\w+)\}\}", fill, _asset("prometheus", "rules.yaml"))
    yaml.safe_load(text)  # a template that renders to invalid YAML fails here, not in Prometheus
    return text


def scrape_config(cfg: DictConfig, kuberay: bool, rules_file: str = "rules.yaml") -> dict[str, Any]:
    """A Prometheus config that scrapes Ray's metrics endpoint and loads the rules: a local
    Ray on ray.metrics_export_port (or, when that is null, the targets Ray itself lists in
    its service-discovery file), or the RayService's pods on their `metrics` port."""
    base: dict[str, Any] = {"global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
                            "rule_files": [rules_file]}
    if kuberay:
        job = {"job_name": "ray", "kubernetes_sd_configs": [{"role": "pod",
                                                                "namespaces": {"names": [cfg.deploy.namespace]}}],
               "relabel_configs": [
                   {"source_labels": ["__meta_kubernetes_pod_label_ray_io_is_ray_node"], "regex": "yes",
                    "action": "keep"},
                   {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics",
                    "action": "keep"},
                   {"source_labels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "target_label": "ray_cluster"},
                   {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}]}
    elif cfg.ray.metrics_export_port:
        job = {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{int(cfg.ray.metrics_export_port)}"]}]}
    else:
        job = {"job_name": "ray", "file_sd_configs": [{"files": ["/tmp/ray/prom_metrics_service_discovery.json"]}]}
    return {**base, "scrape_configs": [job]}


def dashboards() -> dict[str, str]:
    """Grafana dashboards by file name (JSON, a `datasource` variable picks the Prometheus)."""
    folder = resources.files("mlplatform.deploy_assets").joinpath("grafana")
    return {f.name: f.read_text(encoding="utf-8") for f in folder.iterdir() if f.name.endswith(".json")}


def write_monitoring(cfg: DictConfig, out: str) -> dict[str, str]:
    mon = storage.join(out, "monitoring")
    paths = {"rules": storage.join(mon, "rules.yaml"), "prometheus": storage.join(mon, "prometheus.yml"),
             "prometheus_kuberay": storage.join(mon, "prometheus-kuberay.yml")}
    storage.write_text(paths["rules"], render_rules(cfg))
    storage.write_text(paths["prometheus"], "# prometheus --config.file=prometheus.yml (docs/operations.md)\n" +
                       dump(scrape_config(cfg, kuberay=False)))
    storage.write_text(paths["prometheus_kuberay"], "# Prometheus inside the cluster, with rules.yaml beside it\n" +
                       dump(scrape_config(cfg, kuberay=True)))
    for name, text in dashboards().items():
        paths[f"dashboard_{name.removesuffix('.json')}"] = storage.join(mon, "grafana", name)
        storage.write_text(paths[f"dashboard_{name.removesuffix('.json')}"], text)
    return paths


def cluster_bound(cfg: DictConfig) -> DictConfig:
    """cfg with serve.host = deploy.serve_host: the files describe Serve as the cluster runs it,
    and serve.auth's rule for a non-loopback address applies to that address."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.serve.host = cfg.deploy.serve_host
    return cfg


def run_deploy(cfg: DictConfig) -> dict[str, Any]:
    cfg = cluster_bound(cfg)
    out = (storage.resolve_root(cfg.deploy.out_dir) if cfg.deploy.out_dir
           else storage.join(storage.resolve_root(cfg.paths.root), "deploy", cfg.serve.app_name))
    serve_cfg = serve_config(cfg)
    serve_gpu, train_gpu = _gpus(serve_cfg) > 0, _train_gpus(cfg) > 0
    paths = {"serve_config": storage.join(out, "serve_config.yaml"),
             "rayservice": storage.join(out, "rayservice.yaml"),
             **{f"rayjob_{m}": storage.join(out, f"rayjob-{m}.yaml") for m in JOB_MODES},
             "pvc": storage.join(out, "pvc.yaml")}
    storage.write_text(paths["serve_config"], "# serve deploy serve_config.yaml\n" +
                       dump(serve_cfg))
    storage.write_text(paths["pvc"], "# kubectl apply -f pvc.yaml (first: every pod mounts it)\n" +
                       dump(pvc(cfg)))
    storage.write_text(paths["rayservice"], "# kubectl apply -f rayservice.yaml\n" +
                       dump(rayservice(cfg, serve_cfg)))
    for m in JOB_MODES:
        storage.write_text(paths[f"rayjob_{m}"], f"# kubectl create -f rayjob-{m}.yaml\n" +
                           dump(rayjob(cfg, m)))
    paths.update(write_monitoring(cfg, out))
    local_root, mount_path = storage_roots(cfg)
    return {"mode": "deploy", **paths, "gpu": serve_gpu, "image": cfg.deploy.image,
            # One image for the service and the jobs: FROM the GPU base when either needs one.
            "docker_build": docker_build(cfg, serve_gpu or train_gpu),
            "storage": {"claim": cfg.deploy.storage.claim, "cluster_root": mount_path, "read_here": local_root},
            "applications": [a["name"] for a in serve_cfg["applications"]],
            "resolved": OmegaConf.to_container(cfg.serve.versions, resolve=True)}
