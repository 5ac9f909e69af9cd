"""Who may call which route, and how often: API keys with roles, and token buckets.

Secrets never travel: the `+mode=serve` driver reads each key's secret (an environment
variable or a file, how Kubernetes mounts a Secret) and puts only its sha256 in the ingress's
user_config; a cluster config (`+mode=deploy`) names the variable or file and the ingress
resolves and hashes it in its own process. A presented key is hashed and compared with every
declared hash in constant time, so timing tells neither whether nor which key matched.

Rates are token buckets per key and per client address. Each of the N ingress replicas
running (the live count, which autoscaling changes) enforces rate/N and burst/N of its own: no
shared state on the request path, and across replicas a client gets at most burst + rate*T in
T seconds, plus a bounded excess while a scale-up is not yet seen (docs/serving.md, Access).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from mlplatform.deployments.errors import ApiError
from mlplatform.errors import ConfigError


class Strict(BaseModel):
    # Not config.typed's: config.validate imports this module, so it must not import config.
    model_config = ConfigDict(extra="forbid")

ROLES = ("predict", "feedback", "admin")
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
LOOPBACK = ("127.", "::1", "localhost")
# Client-address buckets kept per replica; past it, full (idle) ones are dropped.
MAX_CLIENTS = 10_000


class Bucket(Strict):
    rate: float  # tokens (requests) per second
    burst: float


class KeySettings(Strict):
    id: str
    roles: list[str]
    rate: float
    burst: float
    # One of: sha256 (hashed by the serve driver), or where the ingress reads the secret.
    sha256: str | None
    secret_env: str | None
    secret_file: str | None
    # Read by feedback trust (data.captured.trusted_keys), carried here for the ingress.
    trusted_labeller: bool


class AuthSettings(Strict):
    """The ingress's part of serve.auth (in its user_config: changes apply in place)."""

    enforced: bool
    keys: list[KeySettings]
    client: Bucket
    feedback: Bucket


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def read_secret(key_id: str, secret_env: str | None, secret_file: str | None, where: str) -> str:
    """The secret of a key, from its variable or file; errors name the source, never the value."""
    if secret_env:
        value = os.environ.get(secret_env, "").strip()
        if not value:
            raise ConfigError(f"{where}.secret_env", secret_env, f"environment variable for key {key_id!r} "
                              "is unset or empty")
        return value
    try:
        value = Path(str(secret_file)).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where}.secret_file", secret_file, f"cannot read key {key_id!r}'s secret: "
                          f"{type(exc).__name__}") from None
    if not value:
        raise ConfigError(f"{where}.secret_file", secret_file, f"key {key_id!r}'s secret file is empty")
    return value


def is_loopback(host: str) -> bool:
    return str(host).startswith(LOOPBACK)


def enforcement(required: str, host: str, n_keys: int) -> tuple[bool, str]:
    """Whether keys are checked, and the start-up line that says why. Raises ConfigError when
    serving would be open on a non-loopback address without an explicit required=false."""
    required = str(required).lower()
    if required == "false":
        return False, f"open: serve.auth.required=false (bound to {host}); keys are not checked"
    if n_keys:
        return True, f"keys required: {n_keys} key(s) declared in serve.auth.keys (bound to {host})"
    if required == "true":
        raise ConfigError("serve.auth.keys", [], "serve.auth.required=true but no key is declared")
    if not is_loopback(host):
        raise ConfigError("serve.auth.keys", [], f"serve.host={host} is not loopback: declare keys, or set "
                          "serve.auth.required=false to serve it open")
    return False, f"open: no keys declared and bound to loopback ({host})"


def route_role(path: str) -> str | None:
    """The role a path needs; None: open to anyone."""
    if path in OPEN_PATHS:
        return None
    if path == "/feedback":
        return "feedback"
    if path in ("/predict", "/models", "/v2") or path.startswith("/v2/models/"):
        return "predict"
    return "admin"  # /monitoring and any operator route


def presented_secret(headers) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None


class TokenBucket:
    """rate tokens per second up to burst; `take` answers 0 (admitted) or seconds to wait."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def take(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.at) * self.rate >= self.burst

    def resize(self, rate: float, burst: float, now: float) -> None:
        """A new share (the replica count or the limit changed): the tokens it holds, at most
        the new burst. A larger share mints none, so scaling hands out no fresh burst."""
        tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.rate, self.burst, self.tokens, self.at = rate, burst, min(burst, tokens), now


class Limiter:
    """Token buckets by name, each at this replica's share (1/replicas) of rate and burst,
    replicas being the ingress replicas running now (`replicas()`, at least 1). A burst share
    under 1 is raised to 1 so a replica can admit anything at all."""

    def __init__(self, replicas: Callable[[], int]) -> None:
        self.replicas = replicas
        self.buckets: dict[tuple[str, str], TokenBucket] = {}

    def take(self, kind: str, name: str, limit: Bucket, now: float) -> float:
        n = max(1, self.replicas())
        rate, burst = limit.rate / n, max(1.0, limit.burst / n)
        bucket = self.buckets.get((kind, name))
        if bucket is None:
            bucket = self.buckets[(kind, name)] = TokenBucket(rate, burst, now)
            if len(self.buckets) > MAX_CLIENTS:
                self.buckets = {k: b for k, b in self.buckets.items() if not b.full(now)}
        elif bucket.rate != rate or bucket.burst != burst:  # replicas scaled, or the limit changed in place
            bucket.resize(rate, burst, now)
        return bucket.take(now)


class Access:
    """The ingress's check: who is calling (key id or None), may they, and not too often.
    `replicas`: the ingress replicas running now; each enforces its share of every rate."""

    def __init__(self, replicas: Callable[[], int]) -> None:
        self.limiter = Limiter(replicas)
        self.settings: AuthSettings | None = None
        self.hashes: list[tuple[str, KeySettings]] = []

    def configure(self, settings: AuthSettings) -> None:
        """Keys given by variable or file (a cluster config) are read here, in the ingress."""
        hashes = []
        for i, k in enumerate(settings.keys):
            digest = k.sha256 or sha256_hex(read_secret(k.id, k.secret_env, k.secret_file, f"serve.auth.keys[{i}]"))
            hashes.append((digest, k))
        self.settings, self.hashes = settings, hashes

    def _match(self, secret: str) -> KeySettings | None:
        digest = sha256_hex(secret)
        found = None
        for known, key in self.hashes:  # every key compared: the time does not depend on which
            if hmac.compare_digest(digest, known):
                found = key
        return found

    def _limit(self, kind: str, name: str, limit: Bucket, now: float) -> None:
        wait = self.limiter.take(kind, name, limit, now)
        if wait:
            raise ApiError(429, "rate_limited", f"over the rate of {limit.rate:g} requests/s "
                           f"(burst {limit.burst:g}) for this {kind}; retry later",
                           {"Retry-After": str(max(1, math.ceil(wait)))})

    def check(self, path: str, headers, client: str | None) -> str | None:
        """The caller's key id (None: open access or an open route); ApiError 401, 403 or 429."""
        s = self.settings
        role = route_role(path)
        if s is None or not s.enforced or role is None:
            return None
        now = time.monotonic()
        self._limit("client address", client or "-", s.client, now)
        secret = presented_secret(headers)
        key = self._match(secret) if secret else None
        if key is None:
            raise ApiError(401, "unauthenticated", "a valid API key is required: send 'Authorization: Bearer "
                           "<key>' or 'x-api-key: <key>'" if secret is None else "unknown API key",
                           {"WWW-Authenticate": "Bearer"})
        if role not in key.roles:
            raise ApiError(403, "forbidden", f"key {key.id!r} lacks the role {role!r} this route needs")
        self._limit("key", key.id, Bucket(rate=key.rate, burst=key.burst), now)
        if role == "feedback":
            self._limit("key's feedback", key.id, s.feedback, now)
        return key.id
