"""Semantic checks: what a type cannot express (fractions that sum to 1, existing paths, known
names), so that a bad value fails before any Ray work with one line naming the key."""

from __future__ import annotations

import math
import os
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from mlplatform.config.schema import PIPELINE_STEPS
from mlplatform.errors import ConfigError

DRIFT_KINDS = ("brightness", "blur", "noise", "color_cast", "background")
DATA_SOURCES = ("synthetic", "folder", "captured")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def _positive(key: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(key, value, "must be a positive number")


def _fraction(key: str, value: float, low_open: bool = True) -> None:
    ok = (0 < value < 1) if low_open else (0 <= value <= 1)
    if not ok or math.isnan(value):
        raise ConfigError(key, value, "must be in (0, 1)" if low_open else "must be in [0, 1]")


def parse_since(value: str) -> datetime:
    """A time as an aware UTC datetime: a date, an ISO timestamp, or a duration back from
    now (`90s`, `30m`, `24h`, `7d`)."""
    value = str(value).strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(value[:-1]) * units[value[-1]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = datetime.combine(date.fromisoformat(value), datetime.min.time())
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def validate_data(data: DictConfig, key: str = "data") -> None:
    if data.source not in DATA_SOURCES:
        raise ConfigError(f"{key}.source", data.source, f"must be one of {', '.join(DATA_SOURCES)}")
    splits = data.splits
    for name in ("train", "val", "test"):
        _fraction(f"{key}.splits.{name}", splits[name])
    total = splits.train + splits.val + splits.test
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"{key}.splits",
            f"{splits.train}+{splits.val}+{splits.test}",
            f"train+val+test must sum to 1, got {total:g}",
        )
    if data.source == "folder" and "://" not in data.root and not os.path.isdir(data.root):
        raise ConfigError(f"{key}.root", data.root, "directory does not exist")
    if data.source == "captured":
        cap = data.captured
        if cap is None:
            raise ConfigError(f"{key}.captured", None, "source=captured needs the captured block (data=captured)")
        if cap.base not in ("none", "synthetic", "folder"):
            raise ConfigError(f"{key}.captured.base", cap.base, "must be none, synthetic or folder")
        if cap.base == "folder" and (not cap.base_root or ("://" not in cap.base_root
                                                             and not os.path.isdir(cap.base_root))):
            raise ConfigError(f"{key}.captured.base_root", cap.base_root, "must be an existing ImageFolder tree")
        bad = [k for k in cap.trusted_keys if not str(k).strip()]
        if bad:
            raise ConfigError(f"{key}.captured.trusted_keys", list(cap.trusted_keys), "key ids must not be empty")
        if cap.since is not None:
            try:
                parse_since(cap.since)
            except ValueError:
                raise ConfigError(f"{key}.captured.since", cap.since,
                                  "use a date, an ISO time or a duration like 7d") from None
    needs_generator = data.source == "synthetic" or (data.source == "captured" and data.captured.base == "synthetic")
    syn = data.synthetic
    if syn is None and needs_generator:
        raise ConfigError(f"{key}.synthetic", None, f"source={data.source} needs the generator's parameters")
    if syn is not None:
        _positive(f"{key}.synthetic.num_classes", syn.num_classes)
        _positive(f"{key}.synthetic.images_per_class", syn.images_per_class)
        if syn.image_size < 16:
            raise ConfigError(f"{key}.synthetic.image_size", syn.image_size, "must be at least 16")
        for kind in syn.drift.kinds:
            if kind not in DRIFT_KINDS:
                raise ConfigError(
                    f"{key}.synthetic.drift.kinds", kind, f"unknown drift kind; one of {', '.join(DRIFT_KINDS)}"
                )
        _fraction(f"{key}.synthetic.drift.strength", syn.drift.strength, low_open=False)
    _positive(f"{key}.max_per_class", data.max_per_class, allow_none=True)
    if data.since is not None:
        try:
            parse_since(data.since)
        except ValueError:
            raise ConfigError(f"{key}.since", data.since, "not an ISO date (YYYY-MM-DD) or timestamp") from None
    for ext in data.extensions:
        if not ext.startswith("."):
            raise ConfigError(f"{key}.extensions", ext, "each extension starts with a dot")
    _positive(f"{key}.inspect_batch_size", data.inspect_batch_size)
    q = data.quality
    if q.min_images_per_class < 0:
        raise ConfigError(f"{key}.quality.min_images_per_class", q.min_images_per_class, "must be >= 0")
    if q.min_images_per_split < 0:
        raise ConfigError(f"{key}.quality.min_images_per_split", q.min_images_per_split, "must be >= 0")
    _fraction(f"{key}.quality.max_unreadable_fraction", q.max_unreadable_fraction, low_open=False)
    if q.max_cross_split_duplicates < 0:
        raise ConfigError(
            f"{key}.quality.max_cross_split_duplicates", q.max_cross_split_duplicates, "must be >= 0"
        )
    p = data.preprocess
    _positive(f"{key}.preprocess.image_size", p.image_size)
    if p.resize_size < p.image_size:
        raise ConfigError(f"{key}.preprocess.resize_size", p.resize_size, "must be >= preprocess.image_size")
    if len(p.mean) != 3 or len(p.std) != 3:
        raise ConfigError(f"{key}.preprocess.mean/std", f"{list(p.mean)}/{list(p.std)}", "need 3 values each (RGB)")
    for i, s in enumerate(p.std):
        if s <= 0:
            raise ConfigError(f"{key}.preprocess.std[{i}]", s, "must be positive")
    if p.interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"{key}.preprocess.interpolation", p.interpolation, f"must be one of {', '.join(INTERPOLATIONS)}"
        )


def validate_ray(ray_cfg: DictConfig) -> None:
    addr = ray_cfg.address
    if addr is not None and addr != "auto" and not addr.startswith("ray://") and ":" not in addr:
        raise ConfigError("ray.address", addr, "use auto, ray://host:10001 or host:port")
    _positive("ray.num_cpus", ray_cfg.num_cpus, allow_none=True)


def validate_model(model: Any) -> None:
    if model is None:
        return
    if not isinstance(model, DictConfig) or "_target_" not in model:
        raise ConfigError("model", model, "needs a _target_")
    weights = model.get("weights_path")
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError("model.weights_path", weights, "file does not exist")


# Ray's placement group strategies (ray.util.placement_group).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def validate_train(train: DictConfig) -> None:
    for key in ("epochs", "batch_size", "eval_batch_size"):
        _positive(f"train.{key}", train[key])
    _positive("train.scaling.num_workers", train.scaling.num_workers)
    _positive("train.scaling.cpus_per_worker", train.scaling.cpus_per_worker)
    if train.scaling.gpus_per_worker is not None and train.scaling.gpus_per_worker < 0:
        raise ConfigError("train.scaling.gpus_per_worker", train.scaling.gpus_per_worker, "must be >= 0")
    if train.scaling.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError("train.scaling.placement_strategy", train.scaling.placement_strategy,
                          f"must be one of {', '.join(PLACEMENT_STRATEGIES)}")
    if train.amp not in ("auto", "off", "bf16", "fp16"):
        raise ConfigError("train.amp", train.amp, "must be one of auto, off, bf16, fp16")
    for key in ("checkpoint", "early_stopping"):
        if train[key].mode not in ("max", "min"):
            raise ConfigError(f"train.{key}.mode", train[key].mode, "must be max or min")
        if not train[key].metric.startswith("val/"):
            raise ConfigError(f"train.{key}.metric", train[key].metric, "must be a val/ metric (val/acc, val/loss, val/top5)")
    _positive("train.checkpoint.num_to_keep", train.checkpoint.num_to_keep)
    if train.early_stopping.patience < 1:
        raise ConfigError("train.early_stopping.patience", train.early_stopping.patience, "must be >= 1")
    if not 0 < train.report_poll_s <= 60:
        raise ConfigError("train.report_poll_s", train.report_poll_s, "must be > 0 and <= 60 (seconds)")
    if train.max_failures < -1:
        raise ConfigError("train.max_failures", train.max_failures, "must be >= -1 (-1: retry forever)")
    if not 0 <= train.label_smoothing < 1:
        raise ConfigError("train.label_smoothing", train.label_smoothing, "must be in [0, 1)")
    if train.reference_samples < 0:
        raise ConfigError("train.reference_samples", train.reference_samples, "must be >= 0")
    for key in ("optimizer", "scheduler"):
        node = train[key]
        if key == "optimizer" and node is None:
            raise ConfigError("train.optimizer", None, "needs a _target_ (e.g. torch.optim.AdamW)")
        if node is not None and "_target_" not in node:
            raise ConfigError(f"train.{key}", node, "needs a _target_")
    g = train.gate
    _fraction("train.gate.min_test_acc", g.min_test_acc, low_open=False)
    _fraction("train.gate.max_recall_drop", g.max_recall_drop, low_open=False)


def validate_logger(logger: DictConfig) -> None:
    if logger.wandb is not None and logger.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError("logger.wandb.mode", logger.wandb.mode, "must be offline, online or disabled")
    if logger.wandb is not None and logger.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("logger.wandb.mode", "online", "needs WANDB_API_KEY in the environment")


def validate_serve(serve: DictConfig) -> None:
    """Traffic configs fail before deploying: weights sum to 100, roles, mirrors, limits."""
    if not serve.versions:
        raise ConfigError("serve.versions", [], "list at least one version to serve")
    refs = [v.ref for v in serve.versions]
    if len(set(refs)) != len(refs):
        raise ConfigError("serve.versions", refs, "a version is listed twice")
    roles = [v.role for v in serve.versions]
    for i, v in enumerate(serve.versions):
        if v.role not in ("stable", "canary"):
            raise ConfigError(f"serve.versions[{i}].role", v.role, "must be stable or canary")
        if not 0 <= v.weight <= 100:
            raise ConfigError(f"serve.versions[{i}].weight", v.weight, "must be in [0, 100]")
    if roles.count("stable") != 1:
        raise ConfigError("serve.versions", roles, "exactly one version has role stable")
    total = sum(v.weight for v in serve.versions)
    if total != 100:
        raise ConfigError("serve.versions", "+".join(str(v.weight) for v in serve.versions),
                          f"weights must sum to 100, got {total}")
    for i, sh in enumerate(serve.shadows):
        _fraction(f"serve.shadows[{i}].mirror", sh.mirror, low_open=False)
        if sh.ref in refs:
            raise ConfigError(f"serve.shadows[{i}].ref", sh.ref, "is already served as stable or canary")
    for i, v in enumerate(serve.versions):
        _deployment(f"serve.versions[{i}].deployment", serve, v.deployment)
    for i, sh in enumerate(serve.shadows):
        _deployment(f"serve.shadows[{i}].deployment", serve, sh.deployment)
    validate_serve_settings(serve)


def _deployment(key: str, serve: DictConfig, overrides: Any = None) -> None:
    """serve.deployment, or a version's overrides merged onto it, against the closed schema:
    a misspelt key or a wrong type fails here, not silently at deploy time."""
    from mlplatform.config.schema import ServeDeploymentConf

    try:
        d = OmegaConf.merge(OmegaConf.structured(ServeDeploymentConf), serve.deployment, overrides or {})
    except (ConfigKeyError, ValidationError) as exc:
        name = getattr(exc, "key", None)
        given = (overrides or {}).get(name) if name else None
        raise ConfigError(f"{key}.{name}" if name else key, given, str(exc).splitlines()[0]) from None
    where = key if overrides else "serve.deployment"
    if d.min_replicas < 0 or d.max_replicas < max(1, d.min_replicas):
        raise ConfigError(f"{where}.max_replicas", d.max_replicas, "must be >= max(1, min_replicas)")
    if d.max_ongoing_requests <= serve.batching.max_batch_size:
        raise ConfigError(f"{where}.max_ongoing_requests", d.max_ongoing_requests,
                          f"must exceed serve.batching.max_batch_size={serve.batching.max_batch_size}, "
                          "or batches are silently capped")
    for name in ("num_cpus", "num_gpus", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
        if d[name] < 0:
            raise ConfigError(f"{where}.{name}", d[name], "must be >= 0")
    for name in ("metrics_interval_s", "look_back_period_s"):
        _positive(f"{where}.{name}", d[name])
    _per_node(f"{where}.max_replicas_per_node", d.max_replicas_per_node)


def _per_node(key: str, value: Any) -> None:
    # Serve's own range; null: no limit.
    if value is not None and not 1 <= value <= 100:
        raise ConfigError(key, value, "must be null (no limit) or in [1, 100]")


def _ingress(serve: DictConfig) -> None:
    """serve.ingress: autoscaling bounds and resources; at least one replica answers HTTP."""
    i = serve.ingress
    if i.min_replicas < 1:
        raise ConfigError("serve.ingress.min_replicas", i.min_replicas, "must be >= 1: the ingress answers HTTP")
    if i.max_replicas < i.min_replicas:
        raise ConfigError("serve.ingress.max_replicas", i.max_replicas, f"must be >= min_replicas={i.min_replicas}")
    for name in ("target_ongoing_requests", "metrics_interval_s", "look_back_period_s"):
        _positive(f"serve.ingress.{name}", i[name])
    for name in ("upscale_delay_s", "downscale_delay_s", "num_cpus"):
        if i[name] < 0:
            raise ConfigError(f"serve.ingress.{name}", i[name], "must be >= 0")
    _per_node("serve.ingress.max_replicas_per_node", i.max_replicas_per_node)


def validate_serve_settings(serve: DictConfig) -> None:
    """Everything under serve but the traffic split: checked for every mode, before any Ray work."""
    # The classes the ingress builds from serve.inputs check their own keys (ConfigError).
    from mlplatform.deployments.decoding import InputLimits
    from mlplatform.deployments.urlfetch import UrlPolicy

    inputs = OmegaConf.to_container(serve.inputs, resolve=True)
    InputLimits.from_dict({k: v for k, v in inputs.items() if k != "url"})
    UrlPolicy.from_dict(inputs["url"])
    _deployment("serve.deployment", serve)
    _positive("serve.batching.max_batch_size", serve.batching.max_batch_size)
    if serve.batching.batch_wait_timeout_s < 0:
        raise ConfigError("serve.batching.batch_wait_timeout_s", serve.batching.batch_wait_timeout_s, "must be >= 0")
    if serve.accelerator.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("serve.accelerator.device", serve.accelerator.device, "must be auto, cpu or cuda")
    if serve.accelerator.threads < 0:
        raise ConfigError("serve.accelerator.threads", serve.accelerator.threads, "must be >= 0 (0: one per num_cpus)")
    if not 1 <= serve.top_k:
        raise ConfigError("serve.top_k", serve.top_k, "must be >= 1")
    _positive("serve.request_timeout_s", serve.request_timeout_s)
    _ingress(serve)
    if str(serve.block).lower() not in ("auto", "true", "false"):
        raise ConfigError("serve.block", serve.block, "must be auto, true or false")
    if not 0 < serve.port < 65536:
        raise ConfigError("serve.port", serve.port, "must be a TCP port")
    _auth(serve)


def _auth(serve: DictConfig) -> None:
    """serve.auth: every key well formed, and keys where the bind address needs them."""
    from mlplatform.deployments.access import ROLES, enforcement

    a = serve.auth
    if str(a.required).lower() not in ("auto", "true", "false"):
        raise ConfigError("serve.auth.required", a.required, "must be auto, true or false")
    for name in ("client", "feedback"):
        _positive(f"serve.auth.{name}.rate", a[name].rate)
        if a[name].burst < 1:
            raise ConfigError(f"serve.auth.{name}.burst", a[name].burst, "must be >= 1")
    seen: set[str] = set()
    for i, k in enumerate(a["keys"]):
        key = f"serve.auth.keys[{i}]"
        if not str(k.id).strip() or str(k.id) in seen:
            raise ConfigError(f"{key}.id", k.id, "must be a non-empty id used once")
        seen.add(str(k.id))
        if not k.roles or set(k.roles) - set(ROLES):
            raise ConfigError(f"{key}.roles", list(k.roles), f"one or more of {', '.join(ROLES)}")
        _positive(f"{key}.rate", k.rate)
        if k.burst < 1:
            raise ConfigError(f"{key}.burst", k.burst, "must be >= 1")
        if bool(k.secret_env) == bool(k.secret_file):
            raise ConfigError(key, k.id, "set exactly one of secret_env and secret_file")
    if not str(a.k8s_secret).strip():
        raise ConfigError("serve.auth.k8s_secret", a.k8s_secret, "must name a Kubernetes Secret")
    enforcement(a.required, serve.host, len(a["keys"]))


def validate_monitor(m: DictConfig) -> None:
    _positive("monitor.window_size", m.window_size)
    _positive("monitor.interval_s", m.interval_s)
    _fraction("monitor.p_val_budget", m.p_val_budget)
    _positive("monitor.capture.flush_interval_s", m.capture.flush_interval_s)
    if not 0 <= m.capture.sample_images <= 1:
        raise ConfigError("monitor.capture.sample_images", m.capture.sample_images, "must be in [0, 1]")
    if m.alerts.action not in ("none", "log", "retrain"):
        raise ConfigError("monitor.alerts.action", m.alerts.action, "must be none, log or retrain")
    _positive("monitor.alerts.min_consecutive", m.alerts.min_consecutive)
    _positive("monitor.alerts.feedback_flood_labels", m.alerts.feedback_flood_labels)
    _positive("monitor.alerts.feedback_flood_interval_s", m.alerts.feedback_flood_interval_s)
    _positive("monitor.capture.lookup_days", m.capture.lookup_days)
    if not 0 <= m.nice <= 19:  # a negative nice would put the monitor above the request path
        raise ConfigError("monitor.nice", m.nice, "must be in [0, 19]")
    for key in ("image_cache", "image_cache_mb"):
        if not m.capture[key] >= 0:  # NaN too
            raise ConfigError(f"monitor.capture.{key}", m.capture[key], "must be 0 (no cache) or more")
    _positive("monitor.quality.window", m.quality.window)
    if not 0 <= m.quality.min_accuracy <= 1:
        raise ConfigError("monitor.quality.min_accuracy", m.quality.min_accuracy, "must be in [0, 1]")
    dets = m.detectors or {}
    if not isinstance(dets, DictConfig):
        raise ConfigError("monitor.detectors", dets, "must map names to {_target_: ...}")
    for name, spec in dets.items():
        if spec is None:
            continue
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            raise ConfigError(f"monitor.detectors.{name}", spec, "needs a _target_")
        p = spec.get("p_val")
        if p is not None and not 0 < p < 1:
            raise ConfigError(f"monitor.detectors.{name}.p_val", p, "must be in (0, 1)")
        ert, nb = spec.get("ert"), spec.get("n_bootstraps")
        if ert is not None and nb is not None and nb < 2 * ert:
            raise ConfigError(f"monitor.detectors.{name}.n_bootstraps", nb, f"must be at least 2 x ert ({ert})")
        ws = spec.get("window_size")
        if ws is not None and ws < 1:
            raise ConfigError(f"monitor.detectors.{name}.window_size", ws, "must be >= 1")
    for key in ("since", "until"):
        value = m.report.get(key)
        if value:
            try:
                parse_since(value)
            except ValueError:
                raise ConfigError(f"monitor.report.{key}", value,
                                  "use an ISO time, a date or a duration like 24h") from None


def validate_pipeline(cfg: DictConfig) -> None:
    steps = list(cfg.pipeline.steps)
    for s in steps:
        if s not in PIPELINE_STEPS:
            raise ConfigError("pipeline.steps", s, f"unknown step; one of {', '.join(PIPELINE_STEPS)}")
    if len(set(steps)) != len(steps) or ("train" in steps and "tune" in steps):
        raise ConfigError("pipeline.steps", steps, "each step once, and train or tune, not both")
    order = [s if s != "tune" else "train" for s in steps]
    canonical = [s for s in PIPELINE_STEPS if s != "tune"]
    if order != canonical[:len(order)]:
        raise ConfigError("pipeline.steps", steps, "steps run in the order " + ", ".join(canonical)
                          + " (a prefix of it; tune may replace train)")
    if "tune" in steps and cfg.train.tune is None:
        raise ConfigError("pipeline.steps", "tune", "needs a search space: +train/tune=asha")
    for sl in cfg.pipeline.evaluate.slices:
        if sl not in ("captured", "drifted"):
            raise ConfigError("pipeline.evaluate.slices", sl, "must be captured or drifted")
    for kind in cfg.pipeline.evaluate.drift.kinds:
        if kind not in DRIFT_KINDS:
            raise ConfigError("pipeline.evaluate.drift.kinds", kind, f"unknown drift kind; one of {', '.join(DRIFT_KINDS)}")
    _fraction("pipeline.evaluate.drift.strength", cfg.pipeline.evaluate.drift.strength, low_open=False)
    if not 0 < cfg.pipeline.canary_weight < 100:
        raise ConfigError("pipeline.canary_weight", cfg.pipeline.canary_weight, "must be in (0, 100)")
    r = cfg.rollout
    if not r.steps or any(not 0 < w <= 100 for w in r.steps) or list(r.steps) != sorted(set(r.steps)) \
            or r.steps[-1] != 100:
        raise ConfigError("rollout.steps", list(r.steps), "increasing weights in (0, 100] ending at 100")
    try:
        parse_since(r.window)
    except ValueError:
        raise ConfigError("rollout.window", r.window, "use a duration like 30m, a date or an ISO time") from None
    for key in ("min_requests", "min_feedback", "min_shadow_pairs", "max_looks"):
        if not r[key] >= 1:
            raise ConfigError(f"rollout.{key}", r[key], "must be >= 1")
    for key in ("false_promotion", "false_rollback"):
        if not 0 < r[key] < 0.5:
            raise ConfigError(f"rollout.{key}", r[key], "must be in (0, 0.5): a probability of a wrong decision")
    for key in ("error_margin", "accuracy_margin"):
        if not 0 < r[key] < 1:
            raise ConfigError(f"rollout.{key}", r[key], "must be in (0, 1): an absolute difference of rates")
    if not r.latency_margin > 1:
        raise ConfigError("rollout.latency_margin", r.latency_margin, "must be > 1: a ratio to stable's latency")
    if not 0 <= r.min_agreement <= 1:
        raise ConfigError("rollout.min_agreement", r.min_agreement, "must be in [0, 1]")
    if not r.interval_s > 0:
        raise ConfigError("rollout.interval_s", r.interval_s, "must be > 0 seconds")
    if r.apply_via not in ("git", "direct"):
        raise ConfigError("rollout.apply_via", r.apply_via, "must be git or direct")
    if r.auto and r.apply_via == "git" and not cfg.gitops.repo:
        raise ConfigError("gitops.repo", None, "rollout.auto with rollout.apply_via=git commits each decision "
                          "to gitops.branch of gitops.repo: name the repository, or set rollout.apply_via=direct")


GITOPS_PLACEHOLDERS = ("base", "branch", "title", "body", "body_file", "remote")


def validate_gitops(g: DictConfig) -> None:
    if not g.interval_s > 0:
        raise ConfigError("gitops.interval_s", g.interval_s, "must be > 0 seconds")
    for key in ("branch", "conf_dir", "serve_file", "status_path"):
        if not str(g[key]).strip():
            raise ConfigError(f"gitops.{key}", g[key], "must not be empty")
    if str(g.branch).startswith("-") or " " in str(g.branch):
        raise ConfigError("gitops.branch", g.branch, "not a branch name")
    if g.pr_command is not None:
        import string

        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(str(g.pr_command)) if f is not None}
        except ValueError as exc:
            raise ConfigError("gitops.pr_command", g.pr_command, f"not a command template: {exc}") from None
        unknown = sorted(fields - set(GITOPS_PLACEHOLDERS))
        if unknown:
            raise ConfigError("gitops.pr_command", g.pr_command, f"unknown placeholders {unknown}; "
                              f"use {', '.join('{' + p + '}' for p in GITOPS_PLACEHOLDERS)}")
    for i, o in enumerate(g.overrides):
        if "=" not in str(o):
            raise ConfigError(f"gitops.overrides[{i}]", o, "a Hydra override, key=value")


def _trusted_keys_declared(cfg: DictConfig) -> None:
    """A trusted labeller that serving does not know (a typo) would silently train on nothing
    from that labeller; checked when serve.auth declares keys (a pipeline elsewhere may not)."""
    cap = cfg.data.get("captured")
    declared = {str(k["id"]) for k in OmegaConf.select(cfg, "serve.auth.keys", default=None) or []}
    if cfg.data.source != "captured" or cap is None or not declared:
        return
    unknown = sorted(set(map(str, cap.trusted_keys)) - declared)
    if unknown:
        raise ConfigError("data.captured.trusted_keys", unknown, f"not among serve.auth.keys ({sorted(declared)})")


# Modes that register a version or move an alias (the registry numbers versions with an
# atomic mkdir and guards aliases with flock: a POSIX filesystem).
REGISTERING_MODES = ("train", "tune", "pipeline")
# Modes whose served config captures requests (when monitor.capture.enabled).
CAPTURING_MODES = ("serve", "deploy")


def _posix_roots(cfg: DictConfig, mode: str | None) -> None:
    """A URI root for a mode that registers or captures fails here, before any work."""
    registers = mode in REGISTERING_MODES or (mode == "registry" and cfg.registry.set_alias is not None)
    captures = mode in CAPTURING_MODES and cfg.monitor.capture.enabled
    if not (registers or captures or mode == "deploy"):
        return  # read-only uses of a URI (evaluate, predict, a registry listing) stay
    keys = ["paths.root", "registry.root", *(["monitor.capture.root"] if captures else [])]
    for key in keys:
        value = str(OmegaConf.select(cfg, key))
        if "://" in value:
            raise ConfigError(key, value, "object stores are not supported for registering or capturing "
                              "(the registry needs an atomic mkdir and flock): use a shared POSIX volume, "
                              "deploy.storage (docs/cluster.md)")


def validate_deploy(d: DictConfig) -> None:
    s = d.storage
    if not str(s.mount_path).startswith("/") or str(s.mount_path).rstrip("/") in ("", "/"):
        raise ConfigError("deploy.storage.mount_path", s.mount_path, "must be an absolute path below /")
    for key in ("claim", "capacity"):
        if not str(s[key]).strip():
            raise ConfigError(f"deploy.storage.{key}", s[key], "must not be empty")
    mount = str(s.mount_path).rstrip("/")
    if not str(d.gitops_repo).startswith(mount + "/"):
        raise ConfigError("deploy.gitops_repo", d.gitops_repo, f"must be under deploy.storage.mount_path ({mount}): "
                          "the pipeline RayJob's pods see only that volume")
    if d.min_workers < 0 or d.max_workers < max(1, d.min_workers):
        raise ConfigError("deploy.max_workers", d.max_workers, f"must be >= 1 and >= deploy.min_workers ({d.min_workers})")


def _deploy_access(cfg: DictConfig) -> None:
    """The files +mode=deploy writes bind Serve to deploy.serve_host: serve.auth's rule applies there."""
    from mlplatform.deployments.access import enforcement, is_loopback

    host, a = str(cfg.deploy.serve_host), cfg.serve.auth
    if not host.strip():
        raise ConfigError("deploy.serve_host", host, "must be an address, e.g. 0.0.0.0")
    if not is_loopback(host) and str(a.required).lower() == "auto" and not a["keys"]:
        raise ConfigError("serve.auth.keys", [], f"deploy.serve_host={host} (Serve's address in the cluster) is not "
                          "loopback: declare keys, or set serve.auth.required=false to serve it open")
    enforcement(a.required, host, len(a["keys"]))


def _deploy_sync(cfg: DictConfig) -> None:
    """deploy.sync's sidecar watches gitops.repo from a pod: a URL, or a path on the volume."""
    repo, mount = cfg.gitops.repo, str(cfg.deploy.storage.mount_path).rstrip("/")
    if not cfg.deploy.sync:
        return
    if not repo:
        raise ConfigError("gitops.repo", repo, "deploy.sync=true runs a reconciler that watches it: set a URL "
                          "the cluster's pods can fetch")
    remote = "://" in str(repo) or re.match(r"^[\w.-]+@[\w.-]+:", str(repo))
    if not remote and not str(repo).startswith(mount + "/"):
        raise ConfigError("gitops.repo", repo, f"deploy.sync=true: the head pod sees only URLs and the volume at "
                          f"deploy.storage.mount_path ({mount})")


def validate(cfg: DictConfig, mode: str | None = None) -> None:
    """Semantic checks for the whole config; raises ConfigError naming the first bad key.
    mode: the +mode being run, for checks that only some modes need (None: none of them)."""
    if not str(cfg.paths.root):
        raise ConfigError("paths.root", cfg.paths.root, "must not be empty")
    _posix_roots(cfg, mode)
    validate_deploy(cfg.deploy)
    validate_ray(cfg.ray)
    validate_data(cfg.data)
    _trusted_keys_declared(cfg)
    validate_model(cfg.get("model"))
    validate_train(cfg.train)
    validate_logger(cfg.logger)
    alias = cfg.registry.set_alias
    if alias is not None and (alias.count(":") != 1 or not all(alias.split(":"))):
        raise ConfigError("registry.set_alias", alias, "use alias:version, e.g. production:v3")
    if cfg.serve.versions:
        validate_serve(cfg.serve)
    else:
        validate_serve_settings(cfg.serve)
    if mode == "deploy":
        _deploy_access(cfg)
        _deploy_sync(cfg)
    validate_monitor(cfg.monitor)
    validate_gitops(cfg.gitops)
    validate_pipeline(cfg)
    if cfg.evaluate.split not in ("train", "val", "test", "all"):
        raise ConfigError("evaluate.split", cfg.evaluate.split, "must be train, val, test or all")
