"""+mode=deploy's files as a cluster would take them, with no cluster and no network: the
RayService and RayJobs against KubeRay's own CRD schemas (../shared/schemas/kuberay), the Serve
config against Ray's, the shared volume on every pod, cluster paths only, nothing that nothing
reads; and the image's install step (docker/install.sh) run on a freshly built wheel."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlplatform.errors import ConfigError

from .conftest import ROOT, compose

# KubeRay's CRDs, copied unchanged (tests/data/kuberay/SOURCE.md): a clone need not sit beside ../shared.
SCHEMAS = ROOT / "tests" / "data" / "kuberay"
MOUNT = "/mnt/mlplatform"
SECRET_ENV, SECRET_FILE = "mlp-deploy-test-Xq81Lw2nVb", "mlp-deploy-test-Pz73Ke9mRc"
KEYS = ("serve.auth.keys=[{id: web, roles: [predict], rate: 10, burst: 10, secret_env: MLP_TEST_DEPLOY_KEY},"
        "{id: ops, roles: [admin], rate: 10, burst: 10, secret_file: /etc/mlp-keys/ops}]")


def _registry(root: Path) -> None:
    """A registry with one version and the production alias: what deploy pins (no training)."""
    import torch

    from mlplatform.registry.store import Registry

    reg = Registry(str(root / "registry"), compose().registry.model_name)
    reg.set_alias("production", reg.register({"w": torch.zeros(4)}, {}))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mlplatform.deployments.manifests import run_deploy

    root = tmp_path_factory.mktemp("deploy-root")
    _registry(root)
    os.environ["MLP_TEST_DEPLOY_KEY"] = SECRET_ENV
    try:
        cfg = compose("+mode=deploy", f"paths.root={root}", KEYS)
        summary = run_deploy(cfg)
    finally:
        os.environ.pop("MLP_TEST_DEPLOY_KEY", None)
    out = Path(summary["serve_config"]).parent
    docs = {name: yaml.safe_load((out / f"{name}.yaml").read_text())
            for name in ("serve_config", "rayservice", "rayjob-pipeline", "rayjob-train", "pvc")}
    return {"root": root, "cfg": cfg, "summary": summary, "out": out, "docs": docs}


@functools.cache
def _crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.load((SCHEMAS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=yaml.CSafeLoader)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _pruned(obj: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Fields the API server would drop without a word (a structural schema prunes unknown
    fields instead of refusing them): each one would be a setting nothing reads."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string"):
        return []
    if isinstance(obj, dict):
        props = schema.get("properties")
        if props is None:
            extra = schema.get("additionalProperties")
            return [p for k, v in obj.items() for p in _pruned(v, extra, f"{where}.{k}")] \
                if isinstance(extra, dict) else []
        return [p for k, v in obj.items()
                for p in ([f"{where}.{k}"] if k not in props else _pruned(v, props[k], f"{where}.{k}"))]
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [p for i, v in enumerate(obj) for p in _pruned(v, schema["items"], f"{where}[{i}]")]
    return []


def _check_crd(manifest: dict[str, Any]) -> None:
    import jsonschema

    schema = _crd_schema(manifest["kind"])
    # Not jsonschema.validate: checking KubeRay's large schemas against the metaschema takes a minute.
    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(schema).iter_errors(manifest))
    if error is not None:
        raise error
    assert not _pruned(manifest, schema), f"{manifest['kind']}: fields the CRD does not know: {_pruned(manifest, schema)}"


def _clusters(docs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"rayservice": docs["rayservice"]["spec"]["rayClusterConfig"],
            **{m: docs[m]["spec"]["rayClusterSpec"] for m in ("rayjob-pipeline", "rayjob-train")}}


def _pods(docs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{name}.{group.get('groupName', 'head')}", group["template"]["spec"])
            for name, cluster in _clusters(docs).items()
            for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"])]


def test_rayservice_and_rayjobs_validate_against_kuberay_crds(deployed) -> None:
    docs = deployed["docs"]
    assert (docs["rayservice"]["kind"], docs["rayjob-train"]["kind"]) == ("RayService", "RayJob")
    for name in ("rayservice", "rayjob-pipeline", "rayjob-train"):
        _check_crd(docs[name])
    # The check can fail: a wrong type, and a misspelt field the API server would prune.
    import jsonschema

    bad = yaml.safe_load(yaml.safe_dump(docs["rayjob-train"]))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        _check_crd(bad)
    bad = yaml.safe_load(yaml.safe_dump(docs["rayservice"]))
    bad["spec"]["serveConfigv2"] = bad["spec"].pop("serveConfigV2")
    with pytest.raises(AssertionError, match="serveConfigv2"):
        _check_crd(bad)


def test_serve_config_passes_rays_schema_with_cluster_paths_only(deployed) -> None:
    from ray.serve.schema import ServeDeploySchema

    from mlplatform.deployments.settings import ServeSettings

    serve_cfg = deployed["docs"]["serve_config"]
    ServeDeploySchema.model_validate(serve_cfg)
    assert yaml.safe_load(deployed["docs"]["rayservice"]["spec"]["serveConfigV2"]) == serve_cfg
    settings = serve_cfg["applications"][0]["args"]["settings"]
    ServeSettings.model_validate(settings)  # what build_app is called with in the cluster
    assert settings["registry_root"] == f"{MOUNT}/registry"
    assert settings["capture"]["root"] == f"{MOUNT}/capture"
    assert settings["monitor"]["registry_root"] == f"{MOUNT}/registry"
    assert settings["monitor"]["alerts"]["path"] == f"{MOUNT}/alerts/alerts.jsonl"
    assert settings["monitor"]["alerts"]["trigger_dir"] == f"{MOUNT}/triggers"
    # Read here: the versions were pinned from the registry at this machine's paths.root;
    # each is an application of its own, beside the ingress's.
    from mlplatform.deployments.settings import ModelSettings

    models = serve_cfg["applications"][1:]
    assert [a["name"] for a in models] == [f"{serve_cfg['applications'][0]['name']}-v1"]
    assert models[0]["route_prefix"] is None and models[0]["import_path"].endswith(":build_model")
    model = ModelSettings.model_validate(models[0]["args"]["settings"])
    assert model.version == "v1" and model.registry_root == f"{MOUNT}/registry"
    assert deployed["summary"]["storage"] == {"claim": "mlplatform-shared", "cluster_root": MOUNT,
                                              "read_here": str(deployed["root"])}


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_no_path_of_this_machine_and_no_secret_in_any_generated_file(deployed) -> None:
    files = [p for p in deployed["out"].rglob("*") if p.is_file()]
    assert len(files) >= 8
    here = [str(deployed["root"]), str(ROOT), os.path.expanduser("~"), os.getcwd()]
    secrets = [SECRET_ENV, SECRET_FILE, hashlib.sha256(SECRET_ENV.encode()).hexdigest()]
    for path in files:
        text = path.read_text()
        for s in here + secrets:
            assert s not in text, f"{s!r} in {path.name}"
    docs = deployed["docs"]
    values = _strings(docs["serve_config"]) + _strings(
        {k: v for k, v in docs.items() if k != "serve_config"})
    values += _strings(yaml.safe_load(docs["rayservice"]["spec"]["serveConfigV2"]))
    absolute = {v for v in values if v.startswith("/") and v != "/" and " " not in v}  # "/": a route
    # Cluster paths only: the volume, and where the RayService mounts the keys' Secret.
    assert absolute and all(v.startswith(MOUNT) or v.startswith("/etc/mlp-keys") for v in absolute), absolute


def test_every_pod_mounts_the_shared_claim_and_the_pvc_is_read_write_many(deployed) -> None:
    docs = deployed["docs"]
    pvc = docs["pvc"]
    assert pvc["apiVersion"] == "v1" and pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["metadata"]["name"] == "mlplatform-shared" and pvc["metadata"]["namespace"] == "mlplatform"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert re.fullmatch(r"\d+(Ki|Mi|Gi|Ti)", pvc["spec"]["resources"]["requests"]["storage"])
    assert "storageClassName" not in pvc["spec"]  # null: the cluster's default class
    pods = _pods(docs)
    assert len(pods) == 6
    for where, pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert list(claims.values()) == ["mlplatform-shared"], where
        for c in pod["containers"]:
            assert {"name": next(iter(claims)), "mountPath": MOUNT} in c["volumeMounts"], where
            assert c["image"] == "mlplatform:0.1.0", where
    assert pods[0][1]["containers"][0]["env"][0] == {"name": "MLP_PATHS_ROOT", "value": MOUNT}


def test_rayjob_entrypoints_compose_onto_the_volume_and_join_the_jobs_cluster(deployed, monkeypatch) -> None:
    from mlplatform.deployments.manifests import JOB_MODES

    for mode in JOB_MODES:
        spec = deployed["docs"][f"rayjob-{mode}"]["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        argv = shlex.split(spec["entrypoint"])
        assert argv[:3] == ["python", "-m", "mlplatform"] and f"+mode={mode}" in argv
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        for e in head["env"]:
            monkeypatch.setenv(e["name"], e["value"])
        cfg = compose(*argv[3:])  # the driver's config, in the head pod's environment
        assert cfg.paths.root == MOUNT and cfg.registry.root == f"{MOUNT}/registry"
        assert cfg.gitops.repo == (f"{MOUNT}/gitops" if mode == "pipeline" else None)
        assert cfg.ray.address is None  # the driver joins the job's cluster through RAY_ADDRESS


def _reads(name: str) -> bool:
    """Whether the platform (code or conf/) or Ray Serve reads the variable `name`."""
    import ray

    roots = [(ROOT / "mlplatform", "*.py"), (ROOT / "conf", "*.yaml"), (Path(ray.__file__).parent / "serve", "*.py")]
    return any(name in p.read_text() for root, pattern in roots for p in root.rglob(pattern))


def test_every_env_var_and_ray_start_param_is_read(deployed) -> None:
    from ray.scripts.scripts import start

    cfg = deployed["cfg"]
    secret_envs = {k.secret_env for k in cfg.serve.auth["keys"] if k.secret_env}
    seen = set()
    for where, pod in _pods(deployed["docs"]):
        for c in pod["containers"]:
            for e in c.get("env", []):
                seen.add(e["name"])
                if "valueFrom" in e:  # a key's secret: the ingress reads the variable its key names
                    assert e["name"] in secret_envs and where.startswith("rayservice"), (where, e)
                else:
                    assert _reads(e["name"]), f"{where}: {e['name']} is read by nothing"
    assert {"MLP_PATHS_ROOT", "RAY_SERVE_ENABLE_HA_PROXY", "MLP_TEST_DEPLOY_KEY"} <= seen
    options = {o.lstrip("-") for p in start.params for o in p.opts}
    for name, cluster in _clusters(deployed["docs"]).items():
        for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
            unknown = set(group["rayStartParams"]) - options
            assert not unknown, f"{name}: not options of ray start: {unknown}"
    assert not _reads("MLP_NO_SUCH_VARIABLE_0")  # the audit can fail


def test_deploy_refuses_a_served_path_outside_paths_root(deployed, tmp_path: Path) -> None:
    from mlplatform.deployments.manifests import serve_config

    cfg = compose("+mode=deploy", f"paths.root={deployed['root']}", f"monitor.capture.root={tmp_path}/capture", KEYS)
    with pytest.raises(ConfigError, match=r"monitor\.capture\.root.*not under paths\.root"):
        serve_config(cfg)


@pytest.mark.parametrize("mode, override", [
    ("train", "paths.root=s3://bucket/mlp"), ("pipeline", "paths.root=gs://bucket/mlp"),
    ("serve", "registry.root=s3://bucket/registry"), ("deploy", "paths.root=s3://bucket/mlp"),
    ("serve", "monitor.capture.root=s3://bucket/capture"),
])
def test_object_store_roots_are_refused_before_any_work(mode: str, override: str) -> None:
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as exc:
        compose(f"+mode={mode}", override)
    assert str(exc.value).startswith(f"{key}={value}: ") and "deploy.storage" in str(exc.value)


def test_read_only_modes_keep_object_store_roots() -> None:
    assert compose("+mode=evaluate", "paths.root=s3://bucket/mlp").registry.root == "s3://bucket/mlp/registry"
    assert compose("+mode=registry", "paths.root=s3://bucket/mlp").paths.root == "s3://bucket/mlp"
    with pytest.raises(ConfigError, match="registry.set_alias|paths.root"):
        compose("+mode=registry", "paths.root=s3://bucket/mlp", "registry.set_alias=production:v1")


def test_paths_root_reads_mlp_paths_root(monkeypatch) -> None:
    assert compose().paths.root == "./artifacts"
    monkeypatch.setenv("MLP_PATHS_ROOT", "/data/mlp")
    assert compose().paths.root == "/data/mlp" and compose().monitor.capture.root == "/data/mlp/capture"
    assert compose("paths.root=/elsewhere").paths.root == "/elsewhere"  # the command line wins


# ------------------------------------------------------------------- the image's install step


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_builds_from_the_configured_ray_image_and_runs_only_install_sh() -> None:
    from mlplatform.raycluster import serve_env

    steps = _dockerfile()
    cfg = compose()
    assert steps[0] == ("ARG", f"BASE_IMAGE={cfg.deploy.base_image}") and steps[1] == ("FROM", "${BASE_IMAGE}")
    runs = [args for op, args in steps if op == "RUN"]
    assert runs == ["sh /tmp/mlplatform/docker/install.sh /tmp/mlplatform/dist/*.whl"]
    copies = {args.split()[-1]: args.split()[-2] for op, args in steps if op == "COPY"}
    # install.sh reads constraints.txt beside docker/, as in the repository.
    assert copies == {"/tmp/mlplatform/constraints.txt": "constraints.txt",
                      "/tmp/mlplatform/docker/install.sh": "docker/install.sh", "/tmp/mlplatform/dist/": "dist/*.whl"}
    env = dict(kv.split("=", 1) for op, args in steps if op == "ENV" for kv in shlex.split(args))
    assert env == {"PYTHONUNBUFFERED": "1", **serve_env(bool(cfg.ray.serve_high_throughput))}
    assert not [op for op, _ in steps if op in ("CMD", "ENTRYPOINT")]  # KubeRay's ray start is the entry


def test_deploy_summary_names_the_docker_build_of_deploy_image(deployed) -> None:
    from mlplatform.deployments.manifests import docker_build

    assert deployed["summary"]["docker_build"] == \
        "docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311 -t mlplatform:0.1.0 ."
    assert "BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu " in docker_build(deployed["cfg"], gpu=True)
    assert not (deployed["out"] / "Dockerfile").exists()


def _base_layer(tmp: Path) -> Path:
    """The base image's Python packages (Ray, torch, ...): the project's virtualenv without the
    platform itself, linked into a folder that the fresh venv reads through a .pth file. A real
    base image has them installed; copying them here would take minutes."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and str(ROOT / ".venv") in p))
    layer = tmp / "base-layer"
    layer.mkdir()
    for entry in site.iterdir():
        if not (entry.name.startswith(("mlplatform", "__editable__")) or entry.suffix == ".pth"
                or entry.name == "__pycache__"):
            (layer / entry.name).symlink_to(entry)
    return layer


def test_wheel_carries_conf_and_installs_with_install_sh_in_a_fresh_venv(tmp_path: Path) -> None:
    # A copy of the tree: setuptools writes build/ and egg-info beside the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "mlplatform", "conf", "docker", "constraints.txt"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(src / "dist"), str(src)],
                   check=True, capture_output=True, text=True)
    build_s = time.monotonic() - t0
    wheel, = (src / "dist").glob("mlplatform-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "mlplatform").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    conf = {f"mlplatform/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert conf and conf <= names, sorted(conf - names)
    assets = {str(p.relative_to(ROOT)) for p in (ROOT / "mlplatform" / "deploy_assets").rglob("*")
              if p.is_file() and p.suffix in (".yaml", ".json")}
    assert assets and assets <= names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site, = venv.glob("lib/python3*/site-packages")
    (site / "base-image-layer.pth").write_text(f"{_base_layer(tmp_path)}\n")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    t0 = time.monotonic()
    # The Dockerfile's RUN line, with the repository's paths for the image's.
    run, = [args for op, args in _dockerfile() if op == "RUN"]
    argv = shlex.split(run.replace("/tmp/mlplatform/dist/*.whl", str(wheel)).replace("/tmp/mlplatform", str(src)))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    install_s = time.monotonic() - t0

    empty = tmp_path / "cwd"
    empty.mkdir()
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import mlplatform, mlplatform.cli_check as c; print(mlplatform.__file__); "
                            "print(c.CONF_DIR)"], cwd=empty, env=env, capture_output=True, text=True, check=True)
    module, conf_dir = probe.stdout.split()
    assert module.startswith(str(site)) and conf_dir == str(site / "mlplatform" / "conf"), probe.stdout
    root = tmp_path / "root"
    _registry(root)
    t0 = time.monotonic()
    proc = subprocess.run([python, "-m", "mlplatform", "+mode=deploy", f"paths.root={root}", "serve.auth.required=false"], cwd=empty, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"status": "ok"' in proc.stdout.splitlines()[-1]
    assert (root / "deploy" / "species" / "rayjob-train.yaml").is_file() and not list(empty.iterdir())
    print(f"wheel built in {build_s:.1f} s, install.sh {install_s:.1f} s, "
          f"+mode=deploy from the wheel {time.monotonic() - t0:.1f} s")


def test_deploy_binds_serve_for_the_cluster_and_needs_keys_there(tmp_path: Path) -> None:
    """The files bind Serve to deploy.serve_host (all interfaces: the RayService's Kubernetes
    Service must reach it), so serve.auth's off-loopback rule applies at deploy time."""
    with pytest.raises(ConfigError, match=r"serve\.auth\.keys.*deploy\.serve_host=0\.0\.0\.0.*serve\.auth\.required=false"):
        compose("+mode=deploy", f"paths.root={tmp_path}")
    compose("+mode=deploy", f"paths.root={tmp_path}", "deploy.serve_host=127.0.0.1")  # a cluster on this machine


def test_generated_serve_config_binds_the_cluster_address(deployed) -> None:
    assert deployed["cfg"].serve.host == "127.0.0.1"  # this machine's: not what the cluster binds
    assert deployed["docs"]["serve_config"]["http_options"]["host"] == "0.0.0.0"
    service = deployed["docs"]["rayservice"]["spec"]["serveConfigV2"]
    assert yaml.safe_load(service)["http_options"]["host"] == "0.0.0.0"


def test_deploy_sync_runs_the_reconciler_beside_the_head(tmp_path: Path, monkeypatch) -> None:
    """deploy.sync: a `+mode=sync` sidecar on the RayService's head pod, sharing the head's
    /tmp/ray (a driver needs its node's sockets), env and volumes; its command composes in
    that pod's environment to the repository, branch and overrides given here."""
    from mlplatform.deployments.manifests import (
        SYNC_CONTAINER,
        cluster_bound,
        rayservice,
        serve_config,
    )

    repo = "https://git.example.com/ml/platform-config.git"
    with pytest.raises(ConfigError, match=r"gitops\.repo=None: deploy\.sync=true"):
        compose("+mode=deploy", f"paths.root={tmp_path}", "serve.auth.required=false", "deploy.sync=true")
    with pytest.raises(ConfigError, match=r"gitops\.repo=/home/me/conf: deploy\.sync=true: the head pod sees only"):
        compose("+mode=deploy", f"paths.root={tmp_path}", "serve.auth.required=false", "deploy.sync=true",
                "gitops.repo=/home/me/conf")
    _registry(tmp_path)
    cfg = cluster_bound(compose("+mode=deploy", f"paths.root={tmp_path}", "serve.auth.required=false",
                                "deploy.sync=true", f"gitops.repo={repo}", "gitops.branch=release",
                                "gitops.overrides=['serve.port=8000', 'monitor.enabled=false']"))
    service = rayservice(cfg, serve_config(cfg))
    _check_crd(service)
    pod = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    head, sync = pod["containers"]
    assert sync["name"] == SYNC_CONTAINER and sync["image"] == head["image"] and sync["env"] == head["env"]
    assert {"name": "ray-tmp", "mountPath": "/tmp/ray"} in head["volumeMounts"]
    assert sync["volumeMounts"] == head["volumeMounts"] and {"name": "ray-tmp", "emptyDir": {}} in pod["volumes"]
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert all(v["name"] != "ray-tmp" for v in workers["volumes"])  # the head's only
    argv = sync["command"]
    assert argv[:5] == ["python", "-m", "mlplatform", "+mode=sync", "ray.address=auto"]
    for e in head["env"]:
        monkeypatch.setenv(e["name"], e["value"])
    synced = compose(*argv[3:])
    assert (synced.gitops.repo, synced.gitops.branch, synced.ray.address) == (repo, "release", "auto")
    assert list(synced.gitops.overrides) == ["serve.host=0.0.0.0", "serve.port=8000", "monitor.enabled=false"]
    assert synced.gitops.status_path == f"{MOUNT}/gitops/status.json"  # on the volume: readable from any pod
    cfg.deploy.sync = False
    off = rayservice(cfg, serve_config(cfg))["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert [c["name"] for c in off["containers"]] == ["ray-head"] and "ray-tmp" not in str(off)
