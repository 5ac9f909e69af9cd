"""Typed config schemas (registered in Hydra's ConfigStore) and semantic validation.

The schemas make a typo or a wrong type fail at compose time; `validate` adds the
checks a type cannot express (fractions that sum to 1, existing paths) so that a bad
value fails before any Ray work, with one line naming the key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mlplatform.errors import ConfigError

# ----------------------------------------------------------------------------- schemas


@dataclass
class PathsConf:
    root: str = "./artifacts"


@dataclass
class RayConf:
    # None starts a local Ray; "auto" or "ray://host:10001" joins a cluster.
    address: str | None = None
    num_cpus: int | None = None
    include_dashboard: bool | None = None
    # Prometheus metrics of a locally started Ray (Serve's custom metrics included).
    metrics_export_port: int | None = 8080
    # Ray Serve's high-throughput mode (HAProxy ingress, direct ingress, gRPC between replicas)
    # for a Ray this job starts; a joined cluster keeps the mode it was started with.
    serve_high_throughput: bool = True


@dataclass
class SplitsConf:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    # Changing the salt reshuffles every *new* image; images seen before keep their split.
    salt: str = "splits-v1"


@dataclass
class DriftConf:
    # Any of: brightness, blur, noise, color_cast, background.
    kinds: list[str] = field(default_factory=list)
    strength: float = 0.5


@dataclass
class SyntheticConf:
    num_classes: int = 100
    images_per_class: int = 100
    image_size: int = 64
    seed: int = 0
    drift: DriftConf = field(default_factory=DriftConf)


@dataclass
class QualityConf:
    min_images_per_class: int = 10
    # Each split of each species needs at least this many images.
    min_images_per_split: int = 1
    max_unreadable_fraction: float = 0.01
    # Perceptual-hash duplicates whose copies sit in different splits (a leak).
    max_cross_split_duplicates: int = 0


@dataclass
class PreprocessConf:
    image_size: int = 64
    resize_size: int = 64
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "bilinear"


@dataclass
class CapturedConf:
    # Where serving captured predictions and feedback (monitor.capture.root).
    capture_root: str = "${monitor.capture.root}"
    # Only feedback given on/after this time (a date, ISO time or a duration like 7d).
    since: str | None = None
    # Mixed in with the labelled production images: none, synthetic (data.synthetic's
    # parameters, generated into the same tree) or folder (an ImageFolder at base_root, copied).
    base: str = "none"
    base_root: str | None = None


@dataclass
class DataConf:
    name: str = MISSING
    # synthetic: generate the species dataset into `root`; folder: read an ImageFolder tree.
    source: str = MISSING
    root: str = MISSING
    synthetic: SyntheticConf = field(default_factory=SyntheticConf)
    captured: CapturedConf = field(default_factory=CapturedConf)
    splits: SplitsConf = field(default_factory=SplitsConf)
    # How much data: at most N images per species, only files modified on/after a date.
    max_per_class: int | None = None
    since: str | None = None
    extensions: list[str] = field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"]
    )
    # Rows per Ray Data block when inspecting images (hashing, decoding, statistics).
    inspect_batch_size: int = 256
    quality: QualityConf = field(default_factory=QualityConf)
    preprocess: PreprocessConf = field(default_factory=PreprocessConf)


@dataclass
class ScalingConf:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None


@dataclass
class CheckpointConf:
    num_to_keep: int = 2
    metric: str = "val/acc"
    mode: str = "max"


@dataclass
class EarlyStoppingConf:
    metric: str = "val/acc"
    mode: str = "max"
    patience: int = 3
    min_delta: float = 0.0


@dataclass
class AugmentConf:
    hflip: bool = True
    # Random translation by up to this many pixels (zero padding, then a random crop).
    translate: int = 4


@dataclass
class GateConf:
    min_test_acc: float = 0.5
    # Minimum gain of test/acc over the production version on the same test split.
    min_gain: float = 0.0
    # Largest allowed drop of any single species' recall against production.
    max_recall_drop: float = 0.2
    # Alias a blessed version gets; the very first blessed version also becomes production.
    alias_on_bless: str = "candidate"


@dataclass
class ChaosConf:
    # Kill the rank-0 training worker once, at the start of this epoch (fault-tolerance drills).
    kill_worker_at_epoch: int | None = None


@dataclass
class TrainConf:
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 256
    optimizer: Any = None
    scheduler: Any = None
    label_smoothing: float = 0.0
    augment: AugmentConf = field(default_factory=AugmentConf)
    # Mixed precision on GPU: auto (bfloat16 where supported, else float16), off.
    amp: str = "auto"
    scaling: ScalingConf = field(default_factory=ScalingConf)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    early_stopping: EarlyStoppingConf = field(default_factory=EarlyStoppingConf)
    max_failures: int = 2
    # Validation images whose embeddings and predictions become the monitoring reference.
    reference_samples: int = 500
    torch_threads: int | None = None
    gate: GateConf = field(default_factory=GateConf)
    chaos: ChaosConf = field(default_factory=ChaosConf)
    tune: Any = None


@dataclass
class WandbConf:
    # offline needs neither network nor key; online needs WANDB_API_KEY; disabled turns it off.
    mode: str = "offline"
    project: str = "mlplatform"
    entity: str | None = None
    dir: str = MISSING
    tags: list[str] = field(default_factory=list)
    log_model: bool = True


@dataclass
class LoggerConf:
    wandb: WandbConf | None = None


@dataclass
class RegistryConf:
    root: str = MISSING
    model_name: str = "species-classifier"
    # +mode=registry registry.set_alias=production:v3 moves an alias.
    set_alias: str | None = None


@dataclass
class EvaluateConf:
    # A version id (v3) or an alias (production, candidate).
    version: str = "production"
    # test, val, train or all.
    split: str = "test"


@dataclass
class PromoteConf:
    # The version to judge: a version id, an alias, or "latest".
    candidate: str = "latest"
    baseline: str = "production"


@dataclass
class ServeVersionConf:
    # A registry version id (v3) or alias (production); resolved when deploying.
    ref: str = MISSING
    # stable or canary (weights of both sum to 100).
    role: str = "stable"
    weight: int = 100
    # Per-version overrides of serve.deployment (replicas, CPUs, GPUs, ...).
    deployment: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServeShadowConf:
    ref: str = MISSING
    # Fraction of traffic mirrored to the shadow; its answers are compared, never returned.
    mirror: float = 0.1
    deployment: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServeDeploymentConf:
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Must exceed batching.max_batch_size: Serve's default of 5 silently caps batches.
    max_ongoing_requests: int = 64
    # Requests queued at the caller beyond this get 503 with Retry-After.
    max_queued_requests: int = 128


@dataclass
class ServeBatchingConf:
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01


@dataclass
class ServeAcceleratorConf:
    # auto (cuda when visible), cpu or cuda.
    device: str = "auto"
    half: bool = False
    channels_last: bool = True
    compile: bool = False
    fuse: bool = True
    # CPU threads per model replica's forward pass; 0: Ray's default (one per num_cpus).
    threads: int = 0
    # CPU, fp32: time PyTorch's and oneDNN's 1x1 convolutions per layer and batch size when
    # a replica loads, and run each batch on the faster (see extended.PointwiseConv).
    autotune: bool = True


@dataclass
class ServeUrlConf:
    enabled: bool = False
    allowed_hosts: list[str] = field(default_factory=list)
    allow_private: bool = False
    timeout_s: float = 5.0
    max_bytes: int = 10_000_000
    max_redirects: int = 3


@dataclass
class ServeInputsConf:
    max_bytes: int = 10_000_000
    max_pixels: int = 40_000_000
    min_width: int = 16
    min_height: int = 16
    url: ServeUrlConf = field(default_factory=ServeUrlConf)


@dataclass
class ServeConf:
    app_name: str = "species"
    host: str = "127.0.0.1"
    port: int = 8000
    # The name clients use in /v2/models/{model}; defaults to the registry's model name.
    model_name: str | None = None
    versions: list[ServeVersionConf] = field(default_factory=list)
    shadows: list[ServeShadowConf] = field(default_factory=list)
    # A request header whose value pins a client to one version (hash-based), e.g. x-user-id.
    sticky_header: str | None = None
    request_timeout_s: float = 10.0
    retry_after_s: int = 1
    top_k: int = 5
    batching: ServeBatchingConf = field(default_factory=ServeBatchingConf)
    deployment: ServeDeploymentConf = field(default_factory=ServeDeploymentConf)
    accelerator: ServeAcceleratorConf = field(default_factory=ServeAcceleratorConf)
    inputs: ServeInputsConf = field(default_factory=ServeInputsConf)
    ingress_replicas: int = 1
    ingress_cpus: float = 0.25
    # Block after deploying (auto: when this process started Ray, which dies with it).
    block: str = "auto"
    # Drill knob: versions whose predictions raise (to test that a failing shadow is harmless).
    chaos_fail_versions: list[str] = field(default_factory=list)
    # Train the configured model first when the registry has no version yet (make run).
    train_if_empty: bool = False


@dataclass
class PredictConf:
    # A folder of images (searched recursively) or a snapshot manifest.jsonl.
    input: str | None = None
    # A version id or alias.
    version: str = "production"
    output: str | None = None
    top_k: int = 5
    batch_size: int = 64
    # Actors in the pool, each holding one copy of the extended model.
    concurrency: int = 1
    num_cpus_per_actor: float = 1.0


@dataclass
class DeployConf:
    out_dir: str | None = None
    image: str = "rayproject/ray:2.60.0-py311"
    image_gpu: str = "rayproject/ray:2.60.0-py311-gpu"
    namespace: str = "mlplatform"
    head_cpus: int = 2
    head_memory: str = "8Gi"
    worker_cpus: int = 4
    worker_memory: str = "16Gi"
    worker_gpus: int = 1
    min_workers: int = 1
    max_workers: int = 4


@dataclass
class CaptureConf:
    enabled: bool = True
    root: str = "${paths.root}/capture"
    # Records reach storage within this interval: the most a killed process can lose.
    flush_interval_s: float = 2.0
    # Fraction of requests whose input image is stored (0: none; images are personal data).
    sample_images: float = 0.0
    # Store the image of a request that gets feedback (from a bounded in-memory cache), so
    # labelled production data can be trained on (data=captured).
    store_feedback_images: bool = True
    image_cache: int = 2000
    # Recent request ids kept in memory for /feedback; older ones are looked up in storage.
    index_size: int = 200000
    # Feedback for a request older than this is 404.
    lookup_days: int = 7


@dataclass
class MonitorQualityConf:
    window: int = 100
    min_labels: int = 20
    min_accuracy: float = 0.7


@dataclass
class MonitorAlertsConf:
    path: str = "${paths.root}/alerts/alerts.jsonl"
    action: str = "log"  # none, log, retrain
    min_consecutive: int = 2
    cooldown_s: float = 300.0
    trigger_dir: str = "${paths.root}/triggers"
    retrain_command: list[str] = field(default_factory=list)
    # One alert storm starts one pipeline: no new start within this many seconds.
    retrain_cooldown_s: float = 3600.0


@dataclass
class MonitorReportConf:
    since: str | None = None  # ISO time, a date, or a duration like 24h / 7d
    until: str | None = None
    out_dir: str | None = None
    versions: list[str] = field(default_factory=list)


@dataclass
class MonitorConf:
    enabled: bool = True
    window_size: int = 64
    interval_s: float = 5.0
    # Under heavy traffic score only the newest windows, at most this many per version per
    # poll (the rest are counted as skipped); 0 scores every window.
    max_windows_per_poll: int = 2
    # The per-window false-alarm budget of the batch detectors together (Bonferroni).
    p_val_budget: float = 0.05
    # name -> {_target_: ..., ...}; built with hydra.utils.instantiate.
    detectors: Any = None
    num_cpus: float = 0.25
    # The monitor runs at this nice value, below the request path.
    nice: int = 10
    capture: CaptureConf = field(default_factory=CaptureConf)
    quality: MonitorQualityConf = field(default_factory=MonitorQualityConf)
    alerts: MonitorAlertsConf = field(default_factory=MonitorAlertsConf)
    report: MonitorReportConf = field(default_factory=MonitorReportConf)


PIPELINE_STEPS = ("snapshot", "validate", "split", "train", "tune", "evaluate", "gate", "register", "propose")


@dataclass
class PipelineEvaluateConf:
    # Extra slices the candidate and production are both evaluated on: "captured" (the
    # test split's production images) and "drifted" (the drifted synthetic variant).
    slices: list[str] = field(default_factory=lambda: ["captured", "drifted"])
    drifted_images_per_class: int = 10


@dataclass
class PipelineConf:
    # The steps, in order. `tune` in place of `train` runs the search in conf/train/tune.
    steps: list[str] = field(default_factory=lambda: ["snapshot", "validate", "split", "train", "evaluate",
                                                      "gate", "register", "propose"])
    # Skip a step whose inputs are unchanged and reuse its output.
    cache: bool = True
    evaluate: PipelineEvaluateConf = field(default_factory=PipelineEvaluateConf)
    # The canary weight a blessed candidate is proposed at.
    canary_weight: int = 10
    # Consume the monitor's trigger files (written by alerts with action=retrain).
    trigger_dir: str = "${monitor.alerts.trigger_dir}"


@dataclass
class GitOpsConf:
    # The serve file a proposal edits, relative to `repo` (or the working directory).
    serve_file: str = "conf/serve/default.yaml"
    # A git checkout: each proposal is committed on a new branch there (through a temporary
    # worktree, so the checkout itself is untouched). null: proposals are only written under
    # paths.root/proposals.
    repo: str | None = None
    branch_prefix: str = "rollout/"


@dataclass
class RolloutConf:
    # Canary weight steps; the last (100) completes the promotion.
    steps: list[int] = field(default_factory=lambda: [10, 50, 100])
    window: str = "30m"  # live data considered: a duration, a date or an ISO time
    min_requests: int = 50  # per version, before any decision (else: hold)
    max_error_rate: float = 0.02
    max_error_rate_increase: float = 0.01
    max_latency_p95_ratio: float = 1.5
    min_feedback: int = 20  # labels per version before accuracy counts
    max_accuracy_drop: float = 0.05
    min_shadow_pairs: int = 50
    min_agreement: float = 0.8
    # Apply the proposed weights to the running deployment (else only propose).
    apply: bool = False


@dataclass
class Config:
    paths: PathsConf = field(default_factory=PathsConf)
    ray: RayConf = field(default_factory=RayConf)
    data: DataConf = field(default_factory=DataConf)
    # Built through `_target_`; checked by instantiating it, so left untyped here.
    model: Any = None
    train: TrainConf = field(default_factory=TrainConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    registry: RegistryConf = field(default_factory=RegistryConf)
    evaluate: EvaluateConf = field(default_factory=EvaluateConf)
    promote: PromoteConf = field(default_factory=PromoteConf)
    serve: ServeConf = field(default_factory=ServeConf)
    deploy: DeployConf = field(default_factory=DeployConf)
    predict: PredictConf = field(default_factory=PredictConf)
    monitor: MonitorConf = field(default_factory=MonitorConf)
    pipeline: PipelineConf = field(default_factory=PipelineConf)
    gitops: GitOpsConf = field(default_factory=GitOpsConf)
    rollout: RolloutConf = field(default_factory=RolloutConf)
    seed: int = 0


def register_configs() -> None:
    if not OmegaConf.has_resolver("mlp.join"):
        OmegaConf.register_new_resolver("mlp.join", lambda items: "+".join(str(i) for i in items))
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="data", name="base_data", node=DataConf)
    cs.store(group="train", name="base_train", node=TrainConf)
    cs.store(group="serve", name="base_serve", node=ServeConf)
    cs.store(group="monitor", name="base_monitor", node=MonitorConf)
    cs.store(group="pipeline", name="base_pipeline", node=PipelineConf)


# ----------------------------------------------------------------------------- semantics

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
        if cap.base not in ("none", "synthetic", "folder"):
            raise ConfigError(f"{key}.captured.base", cap.base, "must be none, synthetic or folder")
        if cap.base == "folder" and (not cap.base_root or ("://" not in cap.base_root
                                                             and not os.path.isdir(cap.base_root))):
            raise ConfigError(f"{key}.captured.base_root", cap.base_root, "must be an existing ImageFolder tree")
        if cap.since is not None:
            try:
                parse_since(cap.since)
            except ValueError:
                raise ConfigError(f"{key}.captured.since", cap.since,
                                  "use a date, an ISO time or a duration like 7d") from None
    syn = data.synthetic
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


def validate_train(train: DictConfig) -> None:
    for key in ("epochs", "batch_size", "eval_batch_size"):
        _positive(f"train.{key}", train[key])
    _positive("train.scaling.num_workers", train.scaling.num_workers)
    _positive("train.scaling.cpus_per_worker", train.scaling.cpus_per_worker)
    if train.scaling.gpus_per_worker is not None and train.scaling.gpus_per_worker < 0:
        raise ConfigError("train.scaling.gpus_per_worker", train.scaling.gpus_per_worker, "must be >= 0")
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
    d = serve.deployment
    if d.min_replicas < 0 or d.max_replicas < max(1, d.min_replicas):
        raise ConfigError("serve.deployment.max_replicas", d.max_replicas, "must be >= max(1, min_replicas)")
    if d.max_ongoing_requests <= serve.batching.max_batch_size:
        raise ConfigError("serve.deployment.max_ongoing_requests", d.max_ongoing_requests,
                          f"must exceed serve.batching.max_batch_size={serve.batching.max_batch_size}, "
                          "or batches are silently capped")
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
    if str(serve.block).lower() not in ("auto", "true", "false"):
        raise ConfigError("serve.block", serve.block, "must be auto, true or false")
    if not 0 < serve.port < 65536:
        raise ConfigError("serve.port", serve.port, "must be a TCP port")


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
    for key in ("max_error_rate", "max_error_rate_increase", "max_accuracy_drop", "min_agreement"):
        if not 0 <= r[key] <= 1:
            raise ConfigError(f"rollout.{key}", r[key], "must be in [0, 1]")
    if r.max_latency_p95_ratio < 1:
        raise ConfigError("rollout.max_latency_p95_ratio", r.max_latency_p95_ratio, "must be >= 1")


def validate(cfg: DictConfig) -> None:
    """Semantic checks for the whole config; raises ConfigError naming the first bad key."""
    if not str(cfg.paths.root):
        raise ConfigError("paths.root", cfg.paths.root, "must not be empty")
    validate_ray(cfg.ray)
    validate_data(cfg.data)
    validate_model(cfg.get("model"))
    validate_train(cfg.train)
    validate_logger(cfg.logger)
    alias = cfg.registry.set_alias
    if alias is not None and (alias.count(":") != 1 or not all(alias.split(":"))):
        raise ConfigError("registry.set_alias", alias, "use alias:version, e.g. production:v3")
    if cfg.serve.versions:
        validate_serve(cfg.serve)
    validate_monitor(cfg.monitor)
    validate_pipeline(cfg)
    if cfg.evaluate.split not in ("train", "val", "test", "all"):
        raise ConfigError("evaluate.split", cfg.evaluate.split, "must be train, val, test or all")
