"""Keys, roles and rate limits: the matcher and buckets alone, then real Serve over HTTP."""

from __future__ import annotations

import glob
import io
import os
import time
from pathlib import Path

import pytest
import requests

from mlplatform.deployments.access import (
    Access,
    AuthSettings,
    Bucket,
    Limiter,
    TokenBucket,
    enforcement,
    presented_secret,
    route_role,
    sha256_hex,
)
from mlplatform.errors import ConfigError

from .conftest import SERVE_PORT, compose, run_cli, wait_for

PORT = SERVE_PORT
URL = f"http://127.0.0.1:{PORT}"
MODEL = "species-classifier"
# Made up for the test, so a grep for them can only find a leak.
SECRETS = {"user": "user-Zq81xPbL0rT2", "labeller": "lab-Vk20sNq7Hd4w", "ops": "ops-Rm55tYc9Ea3j",
           "slow": "slow-Xa73kPq1Wb6n"}


def _keys(slow_rate: float = 2, slow_burst: float = 4, extra: str = "") -> str:
    return ("serve.auth.keys=[{id: user, roles: [predict], rate: 1000, burst: 1000, secret_env: MLP_TEST_KEY_USER},"
            "{id: labeller, roles: [feedback], rate: 1000, burst: 1000, secret_env: MLP_TEST_KEY_LAB, "
            "trusted_labeller: true},"
            "{id: ops, roles: [admin, predict], rate: 1000, burst: 1000, secret_file: ${oc.env:MLP_TEST_OPS_FILE}},"
            f"{{id: slow, roles: [predict], rate: {slow_rate}, burst: {slow_burst}, "
            f"secret_env: MLP_TEST_KEY_SLOW}}{extra}]")


# ----------------------------------------------------------------------------- without Ray


def test_token_bucket_admits_burst_then_rate() -> None:
    b = TokenBucket(rate=2, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0, 0, 0]
    assert b.take(0.0) == pytest.approx(0.5)  # one token in 1/rate s
    assert b.take(0.5) == 0 and b.take(0.5) > 0
    assert b.take(100.0) == 0 and b.tokens == pytest.approx(2)  # refilled to burst, not past it


def test_limiter_share_per_replica_bounds_the_total() -> None:
    """Each of N replicas admits rate/N and burst/N: together never more than burst + rate*T."""
    limit = Bucket(rate=10, burst=8)
    replicas = [Limiter(lambda: 2), Limiter(lambda: 2)]
    admitted = 0
    for i in range(400):  # 10 s at 40 requests/s, alternating replicas
        admitted += replicas[i % 2].take("key", "k", limit, i / 40) == 0
    assert 8 + 10 * 10 - 10 <= admitted <= 8 + 10 * 10


def test_limiter_share_follows_the_live_replica_count() -> None:
    """An autoscaled ingress: each replica divides by the replica count it sees now, and a
    bucket whose share changes keeps its tokens (at most the new burst share; none minted).
    Seen at once, a scale-up from 1 to 2 adds only the new replica's burst share to
    burst + rate*T; seen P seconds late by the old replica, at most (2/1 - 1) * (2*burst +
    rate*P) (docs/serving.md, Access)."""
    limit = Bucket(rate=10, burst=8)

    def run(stale_s: float) -> int:
        t, seen_by_a = [0.0], [1]
        a, b = Limiter(lambda: seen_by_a[0]), Limiter(lambda: 2)  # b counts itself: 2 from its start
        admitted = 0
        for i in range(600):  # 15 s at 40 requests/s: a alone, then a and b from 5 s, then a alone
            t[0] = i / 40
            seen_by_a[0] = 2 if 5 + stale_s <= t[0] < 10 + stale_s else 1
            replica = b if 5 <= t[0] < 10 and i % 2 else a
            admitted += replica.take("key", "k", limit, t[0]) == 0
        return admitted

    exact = run(0.0)
    assert 10 * 15 <= exact <= 8 + 10 * 15 + 8 / 2
    late = run(1.0)
    assert late <= 8 + 10 * 15 + (2 * 8 + 10 * 1.0)
    # Halving a drained bucket's share hands out nothing: it stays drained.
    one = Limiter(lambda: n[0])
    n = [1]
    while one.take("key", "k", limit, 0.0) == 0:
        pass
    n[0] = 2
    assert one.take("key", "k", limit, 0.0) > 0


def test_route_roles_and_credentials() -> None:
    assert route_role("/v2/health/live") is None and route_role("/v2/health/ready") is None
    assert {route_role(p) for p in ("/predict", "/models", "/v2", "/v2/models/m", "/v2/models/m/ready",
                                    "/v2/models/m/infer", "/v2/models/m/versions/v1/infer")} == {"predict"}
    assert route_role("/feedback") == "feedback"
    assert route_role("/monitoring") == "admin" and route_role("/anything-else") == "admin"
    assert presented_secret({"authorization": "Bearer abc"}) == "abc"
    assert presented_secret({"authorization": "bearer  abc "}) == "abc"
    assert presented_secret({"x-api-key": "xyz"}) == "xyz"
    assert presented_secret({"authorization": "Basic abc"}) is None and presented_secret({}) is None


def _settings(tmp_path: Path, **overrides) -> AuthSettings:
    secret_file = tmp_path / "ops"
    secret_file.write_text(SECRETS["ops"] + "\n")
    key = {"rate": 1000, "burst": 1000, "sha256": None, "secret_env": None, "secret_file": None,
           "trusted_labeller": False}
    return AuthSettings(**{"enforced": True, "client": {"rate": 1000, "burst": 1000},
                           "feedback": {"rate": 1, "burst": 2}, "keys": [
        {**key, "id": "user", "roles": ["predict"], "sha256": sha256_hex(SECRETS["user"])},
        {**key, "id": "labeller", "roles": ["feedback"], "sha256": sha256_hex(SECRETS["labeller"])},
        {**key, "id": "ops", "roles": ["admin"], "secret_file": str(secret_file)},
    ], **overrides})


def _status(access: Access, path: str, headers: dict[str, str], client: str = "10.0.0.1") -> int | str:
    from mlplatform.deployments.errors import ApiError

    try:
        return access.check(path, headers, client) or "open"
    except ApiError as exc:
        if exc.status == 401:
            assert exc.headers == {"WWW-Authenticate": "Bearer"}
        if exc.status == 429:
            assert int(exc.headers["Retry-After"]) >= 1
        assert not any(s in exc.message for s in SECRETS.values())
        return exc.status


def test_access_check_keys_roles_rates(tmp_path: Path) -> None:
    access = Access(replicas=lambda: 1)
    access.configure(_settings(tmp_path))  # the file key is read and hashed here, as in a cluster
    assert all(k.id != "ops" or d == sha256_hex(SECRETS["ops"]) for d, k in access.hashes)
    assert _status(access, "/predict", {}) == 401
    assert _status(access, "/predict", {"x-api-key": "nope"}) == 401
    assert _status(access, "/predict", {"authorization": f"Bearer {SECRETS['labeller']}"}) == 403
    assert _status(access, "/predict", {"authorization": f"Bearer {SECRETS['user']}"}) == "user"
    assert _status(access, "/monitoring", {"x-api-key": SECRETS["ops"]}) == "ops"
    assert _status(access, "/v2/health/ready", {}) == "open"
    # /feedback's own, lower bucket: burst 2 at 1/s
    lab = {"x-api-key": SECRETS["labeller"]}
    assert [_status(access, "/feedback", lab) for _ in range(3)] == ["labeller", "labeller", 429]
    # the client-address bucket, for a changed setting applied in place
    access.configure(_settings(tmp_path, client={"rate": 1, "burst": 1}))
    user = {"x-api-key": SECRETS["user"]}
    assert [_status(access, "/predict", user, "10.9.9.9") for _ in range(2)] == ["user", 429]
    assert _status(access, "/predict", user, "10.9.9.8") == "user"
    # open access: nobody is asked
    access.configure(AuthSettings(enforced=False, keys=[], client={"rate": 1, "burst": 1},
                                  feedback={"rate": 1, "burst": 1}))
    assert {_status(access, p, {}) for p in ("/predict", "/feedback", "/monitoring")} == {"open"}


def test_enforcement_by_bind_address() -> None:
    assert enforcement("auto", "127.0.0.1", 0)[0] is False
    assert enforcement("auto", "0.0.0.0", 2)[0] is True
    assert enforcement("false", "0.0.0.0", 0)[0] is False
    with pytest.raises(ConfigError, match="not loopback"):
        enforcement("auto", "0.0.0.0", 0)
    with pytest.raises(ConfigError, match="no key"):
        enforcement("true", "127.0.0.1", 0)


@pytest.mark.parametrize("override, key", [
    ("serve.auth.keys=[{id: a, roles: [root], rate: 1, burst: 1, secret_env: X}]", "serve.auth.keys[0].roles"),
    ("serve.auth.keys=[{id: a, roles: [predict], rate: 1, burst: 1, secret_env: X},"
     "{id: a, roles: [predict], rate: 1, burst: 1, secret_env: Y}]", "serve.auth.keys[1].id"),
    ("serve.auth.keys=[{id: a, roles: [predict], rate: 1, burst: 1, secret_env: X, secret_file: /f}]",
     "serve.auth.keys[0]"),
    ("serve.auth.keys=[{id: a, roles: [predict], rate: 1, burst: 1}]", "serve.auth.keys[0]"),
    ("serve.auth.keys=[{id: a, roles: [predict], rate: 0, burst: 1, secret_env: X}]", "serve.auth.keys[0].rate"),
    ("serve.auth.keys=[{id: a, roles: [], rate: 1, burst: 1, secret_env: X}]", "serve.auth.keys[0].roles"),
    ("serve.auth.required=maybe", "serve.auth.required"),
    ("serve.auth.feedback.rate=-1", "serve.auth.feedback.rate"),
    ("serve.auth.client.burst=0", "serve.auth.client.burst"),
    ("serve.host=0.0.0.0", "serve.auth.keys"),
])
def test_bad_auth_config_fails_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        compose("+mode=serve", override)
    assert exc.value.key == key, str(exc.value)


def test_serve_on_a_public_address_without_keys_fails_fast_in_one_line() -> None:
    proc = run_cli("+mode=serve", "serve.host=0.0.0.0", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "serve.auth.keys" in lines[0] and "serve.auth.required=false" in lines[0], lines
    # required=false is the explicit way to serve it open: it gets past validation
    compose("+mode=serve", "serve.host=0.0.0.0", "serve.auth.required=false")


# ----------------------------------------------------------------------------- real Serve


def _overrides(root: Path, *extra: str) -> list[str]:
    return ["+mode=serve", "+experiment=smoke", f"paths.root={root}", f"serve.port={PORT}", "serve.host=0.0.0.0",
            "serve.deployment.num_cpus=0.25", "serve.deployment.min_replicas=1", "serve.deployment.max_replicas=1",
            "serve.ingress.min_replicas=2", "serve.ingress.max_replicas=2", "serve.ingress.num_cpus=0.1", "serve.auth.client.rate=1000",
            "serve.auth.client.burst=1000", *extra]


@pytest.fixture(scope="module")
def keyed(ray_cluster, tmp_path_factory):
    """A trained v1 served on 0.0.0.0 by 2 ingress replicas with four keys."""
    from mlplatform.deployments.serve_mode import deploy, undeploy
    from mlplatform.training.job import run_train

    root = tmp_path_factory.mktemp("access")
    ops_file = root / "ops-key"
    ops_file.write_text(SECRETS["ops"] + "\n")
    env = {"MLP_TEST_KEY_USER": SECRETS["user"], "MLP_TEST_KEY_LAB": SECRETS["labeller"],
           "MLP_TEST_KEY_SLOW": SECRETS["slow"], "MLP_TEST_OPS_FILE": str(ops_file)}
    os.environ.update(env)
    run_train(compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none"))
    summary = deploy(compose(*_overrides(root, _keys())))
    yield {"root": root, "summary": summary}
    undeploy(compose(*_overrides(root, _keys())).serve.app_name)
    for k in env:
        os.environ.pop(k, None)


def _jpeg() -> bytes:
    from mlplatform.data import synthetic

    buf = io.BytesIO()
    synthetic.render(0, 0, 48).save(buf, format="JPEG")
    return buf.getvalue()


def _call(method: str, path: str, key: str | None, bearer: bool = True, **kw) -> requests.Response:
    headers = kw.pop("headers", {})
    if key is not None:
        headers.update({"authorization": f"Bearer {key}"} if bearer else {"x-api-key": key})
    return requests.request(method, URL + path, headers=headers, timeout=30, **kw)


def _routes() -> list[tuple[str, str, str, dict]]:
    """(method, path, role, request kwargs) for every route that needs a key."""
    import base64
    import json

    img = _jpeg()
    oip_body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                       "data": [base64.b64encode(img).decode()]}]})
    return [
        ("POST", "/predict", "predict", {"files": {"image": ("a.jpg", img, "image/jpeg")}}),
        ("GET", "/models", "predict", {}),
        ("GET", "/v2", "predict", {}),
        ("GET", f"/v2/models/{MODEL}", "predict", {}),
        ("GET", f"/v2/models/{MODEL}/ready", "predict", {}),
        ("GET", f"/v2/models/{MODEL}/versions/v1/ready", "predict", {}),
        ("POST", f"/v2/models/{MODEL}/infer", "predict", {"data": oip_body,
                                                         "headers": {"content-type": "application/json"}}),
        ("POST", f"/v2/models/{MODEL}/versions/v1/infer", "predict",
         {"data": oip_body, "headers": {"content-type": "application/json"}}),
        ("POST", "/feedback", "feedback", {"json": {"request_id": "nope", "label": "x"}}),
        ("GET", "/monitoring", "admin", {}),
    ]


WRONG = {"predict": "labeller", "feedback": "user", "admin": "user"}
RIGHT = {"predict": "user", "feedback": "labeller", "admin": "ops"}


def _error_message(r: requests.Response, path: str) -> str:
    body = r.json()
    if path.startswith("/v2"):
        return body["error"] if isinstance(body["error"], str) else body["error"]["message"]
    assert set(body) == {"error", "request_id"} and body["error"]["code"], body
    return body["error"]["message"]


@pytest.mark.ray
def test_every_route_without_key_bad_key_wrong_role_right_role(keyed) -> None:
    for method, path, role, kw in _routes():
        r = _call(method, path, None, **kw)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.status_code, r.text)
        _error_message(r, path)
        r = _call(method, path, "not-a-key", bearer=False, **kw)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.status_code)
        r = _call(method, path, SECRETS[WRONG[role]], **kw)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert WRONG[role] in _error_message(r, path)
        r = _call(method, path, SECRETS[RIGHT[role]], bearer=role != "admin", **kw)
        # past access: the route's own answer (an unknown feedback id is the route's 404)
        assert r.status_code in ((404,) if path == "/feedback" else (200,)), (path, r.status_code, r.text[:300])
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert requests.get(URL + path, timeout=30).status_code == 200
    assert keyed["summary"]["access"].startswith("keys required")


@pytest.mark.ray
def test_rate_limit_across_two_ingress_replicas(keyed) -> None:
    """Key `slow`: rate 2/s, burst 4, over 2 replicas (each 1/s, burst 2). In T seconds it gets
    at most burst + rate*T, and at least half of that when the proxy splits evenly enough."""
    key = SECRETS["slow"]
    wait_for(lambda: _call("GET", "/models", key).status_code == 429, timeout=30)  # drain both replicas
    time.sleep(1.0)  # fill again: a fair start for the count below
    started, ok, limited = time.monotonic(), 0, []
    while time.monotonic() - started < 4.0:
        r = _call("GET", "/models", key)
        if r.status_code == 200:
            ok += 1
        else:
            assert r.status_code == 429, r.text
            limited.append(r)
    elapsed = time.monotonic() - started
    ceiling = 4 + 2 * (elapsed + 1.0)  # burst + rate * (T + the 1 s refill before it)
    assert ok <= ceiling + 1, (ok, ceiling)
    assert ok >= 2 * elapsed / 2, (ok, elapsed)
    r = limited[0]
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "rate_limited"


@pytest.mark.ray
def test_keys_and_rates_change_in_place(keyed) -> None:
    import ray

    from mlplatform.deployments.serve_mode import deploy

    def ingress_actors() -> set[str]:  # Serve names each replica actor: a new replica, a new name
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Ingress#" in a["name"]}

    before = ingress_actors()
    os.environ["MLP_TEST_KEY_NEW"] = "new-Pw38dLs0Ku5y"
    try:
        deploy(compose(*_overrides(keyed["root"], _keys(
            slow_rate=50, slow_burst=40, extra=", {id: new, roles: [predict], rate: 10, burst: 10, secret_env: MLP_TEST_KEY_NEW}"))))
        wait_for(lambda: _call("GET", "/models", "new-Pw38dLs0Ku5y").status_code == 200, timeout=30)
        wait_for(lambda: all(_call("GET", "/models", SECRETS["slow"]).status_code == 200 for _ in range(8)),
                 timeout=30, message="the slow key's new rate (50/s, burst 40) did not apply")
        assert len(before) == 2 and ingress_actors() == before  # in place: the same ingress replicas
    finally:
        deploy(compose(*_overrides(keyed["root"], _keys())))
        os.environ.pop("MLP_TEST_KEY_NEW", None)
    wait_for(lambda: _call("GET", "/models", "new-Pw38dLs0Ku5y").status_code == 401, timeout=30)


@pytest.mark.ray
def test_secret_never_in_logs_records_or_deploy_files(keyed) -> None:
    from mlplatform import ray_compat

    # traffic that reaches capture, feedback and the request logs, with keys in both headers
    r = _call("POST", "/predict", SECRETS["user"], files={"image": ("a.jpg", _jpeg(), "image/jpeg")})
    assert r.status_code == 200
    rid, label = r.json()["request_id"], r.json()["predictions"][0]["label"]
    assert _call("POST", "/feedback", SECRETS["labeller"], bearer=False,
                 json={"request_id": rid, "label": label}).status_code in (202, 404)
    _call("GET", "/models", "wrong-" + SECRETS["user"])
    out = keyed["root"] / "deploy-out"
    proc = run_cli(*_overrides(keyed["root"], _keys())[1:], "+mode=deploy", f"deploy.out_dir={out}",
                   "ray.address=null")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rayservice = (out / "rayservice.yaml").read_text()
    assert "secretKeyRef" in rayservice and "MLP_TEST_KEY_USER" in rayservice and "mlplatform-api-keys" in rayservice
    time.sleep(2)  # capture's flush interval in the smoke config is under a second
    files = [p for p in glob.glob(f"{ray_compat.logs_dir()}/**/*", recursive=True) if os.path.isfile(p)]
    files += [str(p) for p in Path(keyed["root"]).rglob("*") if p.is_file() and p.suffix != ".pt"]
    assert any("requests_Ingress" in f for f in files) and any(str(out) in f for f in files)
    for path in files:
        data = Path(path).read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in data and sha256_hex(secret).encode() not in data or \
                path.endswith("ops-key"), f"{secret[:4]}... found in {path}"


def test_rayservice_wires_keys_from_the_kubernetes_secret() -> None:
    from mlplatform.deployments import manifests

    cfg = compose("+mode=deploy", "serve.auth.keys=[{id: web, roles: [predict], rate: 1, burst: 1, secret_env: MLP_KEY_WEB},"
                  "{id: lab, roles: [feedback], rate: 1, burst: 1, secret_file: /etc/mlp-keys/lab}]")
    svc = manifests.rayservice(cfg, {"applications": [{"deployments": []}]})
    cluster = svc["spec"]["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert {"name": "MLP_KEY_WEB", "valueFrom": {"secretKeyRef": {"name": "mlplatform-api-keys", "key": "web"}}} \
            in container["env"]
        assert {"name": "api-keys-0", "mountPath": "/etc/mlp-keys", "readOnly": True} in container["volumeMounts"]
        assert {"name": "api-keys-0", "secret": {"secretName": "mlplatform-api-keys",
                                                 "items": [{"key": "lab", "path": "lab"}]}} in pod["volumes"]
