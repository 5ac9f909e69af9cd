"""Typed config schemas, registered in Hydra's ConfigStore behind the YAML under `conf/`.

The schemas declare types only: every value, defaults included, lives once in `conf/`, so a
key's default is one search away and no code path can disagree with it. A typo or a wrong
type fails at compose time; `mlplatform.config.validate` adds the checks a type cannot
express. Fields are MISSING (`???`), never a value: a YAML file that forgets one fails at
compose time with the key named. The exceptions are the per-item schemas of lists
(`serve.versions[i]`, `serve.shadows[i]`), whose `deployment` overrides are empty unless given.

Over 400 lines on purpose: it mirrors the whole `conf/` tree, one class per node, and is read
as a map of the keys; split, a key's type would be one search further from its YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class PathsConf:
    root: str = MISSING


@dataclass
class RayConf:
    # None starts a local Ray; "auto" or "ray://host:10001" joins a cluster.
    address: str | None = MISSING
    num_cpus: int | None = MISSING
    include_dashboard: bool | None = MISSING
    # Prometheus metrics of a locally started Ray (Serve's custom metrics included).
    metrics_export_port: int | None = MISSING
    # Ray Serve's high-throughput mode (HAProxy ingress, direct ingress, gRPC between replicas)
    # for a Ray this job starts; a joined cluster keeps the mode it was started with.
    serve_high_throughput: bool = MISSING


@dataclass
class SplitsConf:
    train: float = MISSING
    val: float = MISSING
    test: float = MISSING
    # Changing the salt reshuffles every *new* image; images seen before keep their split.
    salt: str = MISSING


@dataclass
class DriftConf:
    # Any of: brightness, blur, noise, color_cast, background.
    kinds: list[str] = MISSING
    strength: float = MISSING


@dataclass
class SyntheticConf:
    num_classes: int = MISSING
    images_per_class: int = MISSING
    image_size: int = MISSING
    seed: int = MISSING
    drift: DriftConf = field(default_factory=DriftConf)


@dataclass
class QualityConf:
    min_images_per_class: int = MISSING
    # Each split of each species needs at least this many images.
    min_images_per_split: int = MISSING
    max_unreadable_fraction: float = MISSING
    # Perceptual-hash duplicates whose copies sit in different splits (a leak).
    max_cross_split_duplicates: int = MISSING


@dataclass
class PreprocessConf:
    image_size: int = MISSING
    resize_size: int = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    interpolation: str = MISSING


@dataclass
class CapturedConf:
    # Where serving captured predictions and feedback (monitor.capture.root).
    capture_root: str = MISSING
    # Only feedback given on/after this time (a date, ISO time or a duration like 7d).
    since: str | None = MISSING
    # Mixed in with the labelled production images: none, synthetic (data.synthetic's
    # parameters, generated into the same tree) or folder (an ImageFolder at base_root, copied).
    base: str = MISSING
    base_root: str | None = MISSING
    # Key ids whose feedback labels become training data; anyone else's are kept for
    # monitoring and review only. conf/data/captured.yaml derives them from serve.auth.keys.
    trusted_keys: list[str] = MISSING
    # Labels sent without a key (open access, or captured before keys) count as trusted.
    trust_anonymous: bool = MISSING


@dataclass
class DataConf:
    name: str = MISSING
    # synthetic: generate the species dataset into `root`; folder: read an ImageFolder tree.
    source: str = MISSING
    root: str = MISSING
    # The generator's parameters (source=synthetic, or captured with base=synthetic); null otherwise.
    synthetic: SyntheticConf | None = MISSING
    # Only for source=captured.
    captured: CapturedConf | None = MISSING
    splits: SplitsConf = field(default_factory=SplitsConf)
    # How much data: at most N images per species, only files modified on/after a date.
    max_per_class: int | None = MISSING
    since: str | None = MISSING
    extensions: list[str] = MISSING
    # Rows per Ray Data block when inspecting images (hashing, decoding, statistics).
    inspect_batch_size: int = MISSING
    quality: QualityConf = field(default_factory=QualityConf)
    preprocess: PreprocessConf = field(default_factory=PreprocessConf)


@dataclass
class ScalingConf:
    num_workers: int = MISSING
    use_gpu: bool = MISSING
    cpus_per_worker: float = MISSING
    gpus_per_worker: float | None = MISSING
    # The placement group strategy for the workers (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD).
    placement_strategy: str = MISSING


@dataclass
class CheckpointConf:
    num_to_keep: int = MISSING
    metric: str = MISSING
    mode: str = MISSING


@dataclass
class EarlyStoppingConf:
    metric: str = MISSING
    mode: str = MISSING
    patience: int = MISSING
    min_delta: float = MISSING


@dataclass
class AugmentConf:
    hflip: bool = MISSING
    # Random translation by up to this many pixels (zero padding, then a random crop).
    translate: int = MISSING


@dataclass
class GateConf:
    min_test_acc: float = MISSING
    # Minimum gain of test/acc over the production version on the same test split.
    min_gain: float = MISSING
    # Largest allowed drop of any single species' recall against production.
    max_recall_drop: float = MISSING
    # Alias a blessed version gets; the very first blessed version also becomes production.
    alias_on_bless: str = MISSING


@dataclass
class ChaosConf:
    # Kill the rank-0 training worker once, at the start of this epoch (fault-tolerance drills).
    kill_worker_at_epoch: int | None = MISSING


@dataclass
class TrainConf:
    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    label_smoothing: float = MISSING
    augment: AugmentConf = field(default_factory=AugmentConf)
    # Mixed precision on GPU: auto (bfloat16 where supported, else float16), off.
    amp: str = MISSING
    scaling: ScalingConf = field(default_factory=ScalingConf)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    early_stopping: EarlyStoppingConf = field(default_factory=EarlyStoppingConf)
    max_failures: int = MISSING
    # How often Ray Train's controller collects the workers' reports. A worker's next report
    # waits until its last one is collected, so an epoch never takes less than this.
    report_poll_s: float = MISSING
    # Validation images whose embeddings and predictions become the monitoring reference.
    reference_samples: int = MISSING
    torch_threads: int | None = MISSING
    gate: GateConf = field(default_factory=GateConf)
    chaos: ChaosConf = field(default_factory=ChaosConf)
    tune: Any = MISSING


@dataclass
class WandbConf:
    # offline needs neither network nor key; online needs WANDB_API_KEY; disabled turns it off.
    mode: str = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    dir: str = MISSING
    tags: list[str] = MISSING
    log_model: bool = MISSING


@dataclass
class LoggerConf:
    wandb: WandbConf | None = MISSING


@dataclass
class RegistryConf:
    root: str = MISSING
    model_name: str = MISSING
    # +mode=registry registry.set_alias=production:v3 moves an alias.
    set_alias: str | None = MISSING


@dataclass
class EvaluateConf:
    # A version id (v3) or an alias (production, candidate).
    version: str = MISSING
    # test, val, train or all.
    split: str = MISSING


@dataclass
class PromoteConf:
    # The version to judge: a version id, an alias, or "latest".
    candidate: str = MISSING
    baseline: str = MISSING


@dataclass
class ServeVersionConf:
    # A registry version id (v3) or alias (production); resolved when deploying.
    ref: str = MISSING
    # stable or canary (weights of both sum to 100).
    role: str = MISSING
    weight: int = MISSING
    # Per-version overrides of serve.deployment (replicas, CPUs, GPUs, ...).
    deployment: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServeShadowConf:
    ref: str = MISSING
    # Fraction of traffic mirrored to the shadow; its answers are compared, never returned.
    mirror: float = MISSING
    deployment: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServeDeploymentConf:
    min_replicas: int = MISSING
    max_replicas: int = MISSING
    target_ongoing_requests: float = MISSING
    upscale_delay_s: float = MISSING
    downscale_delay_s: float = MISSING
    # How often replicas and callers report in-flight requests, and the window Serve averages them over.
    metrics_interval_s: float = MISSING
    look_back_period_s: float = MISSING
    num_cpus: float = MISSING
    num_gpus: float = MISSING
    # Must exceed batching.max_batch_size: Serve's default of 5 silently caps batches.
    max_ongoing_requests: int = MISSING
    # Requests queued at the caller beyond this get 503 with Retry-After.
    max_queued_requests: int = MISSING
    # Replicas of this deployment on one node at most (1: spread, so a lost node takes one); null: no limit.
    max_replicas_per_node: int | None = MISSING


@dataclass
class ServeIngressConf:
    # Autoscaled on in-flight requests per replica, like a version; at least 1 replica.
    min_replicas: int = MISSING
    max_replicas: int = MISSING
    target_ongoing_requests: float = MISSING
    upscale_delay_s: float = MISSING
    downscale_delay_s: float = MISSING
    # How often replicas and callers report in-flight requests, and the window Serve averages them over.
    metrics_interval_s: float = MISSING
    look_back_period_s: float = MISSING
    num_cpus: float = MISSING
    max_replicas_per_node: int | None = MISSING


@dataclass
class ServeBatchingConf:
    max_batch_size: int = MISSING
    batch_wait_timeout_s: float = MISSING


@dataclass
class ServeAcceleratorConf:
    # auto (cuda when visible), cpu or cuda.
    device: str = MISSING
    half: bool = MISSING
    channels_last: bool = MISSING
    compile: bool = MISSING
    fuse: bool = MISSING
    # CPU threads per model replica's forward pass; 0: Ray's default (one per num_cpus).
    threads: int = MISSING
    # CPU, fp32: time PyTorch's and oneDNN's 1x1 convolutions per layer and batch size when
    # a replica loads, and run each batch on the faster (see extended.PointwiseConv).
    autotune: bool = MISSING


@dataclass
class ServeUrlConf:
    enabled: bool = MISSING
    allowed_hosts: list[str] = MISSING
    allow_private: bool = MISSING
    timeout_s: float = MISSING
    max_bytes: int = MISSING
    max_redirects: int = MISSING
    schemes: list[str] = MISSING


@dataclass
class ServeInputsConf:
    max_bytes: int = MISSING
    max_pixels: int = MISSING
    min_width: int = MISSING
    min_height: int = MISSING
    # Pillow format ids (JPG and TIF are read as JPEG and TIFF); anything else is 415.
    formats: list[str] = MISSING
    # Large JPEGs decoded at 1/2, 1/4 or 1/8 scale, short side kept >= twice the model's
    # resize size; false: always the full image.
    reduced_decode: bool = MISSING
    url: ServeUrlConf = field(default_factory=ServeUrlConf)


@dataclass
class ServeAuthKeyConf:
    id: str = MISSING
    # predict, feedback and/or admin (docs/serving.md, Access).
    roles: list[str] = MISSING
    rate: float = MISSING  # requests/s, a token bucket
    burst: float = MISSING
    # Where the secret is (exactly one): a variable or a file, how Kubernetes mounts a Secret.
    # Omitted: not that source.
    secret_env: str | None = None
    secret_file: str | None = None
    # Its /feedback labels may become training data (data.captured.trusted_keys). Omitted: no.
    trusted_labeller: bool = False


@dataclass
class ServeAuthBucketConf:
    rate: float = MISSING
    burst: float = MISSING


@dataclass
class ServeAuthConf:
    # auto (keys required unless bound to loopback with none declared), true or false.
    required: str = MISSING
    keys: list[ServeAuthKeyConf] = MISSING
    # Per client address, when keys are checked.
    client: ServeAuthBucketConf = field(default_factory=ServeAuthBucketConf)
    # Per key on /feedback, on top of the key's own rate.
    feedback: ServeAuthBucketConf = field(default_factory=ServeAuthBucketConf)
    # The Kubernetes Secret +mode=deploy wires the keys from (one entry per key id).
    k8s_secret: str = MISSING


@dataclass
class ServeConf:
    app_name: str = MISSING
    host: str = MISSING
    port: int = MISSING
    # The name clients use in /v2/models/{model}; defaults to the registry's model name.
    model_name: str | None = MISSING
    versions: list[ServeVersionConf] = MISSING
    shadows: list[ServeShadowConf] = MISSING
    # A request header whose value pins a client to one version (hash-based), e.g. x-user-id.
    sticky_header: str | None = MISSING
    request_timeout_s: float = MISSING
    retry_after_s: int = MISSING
    top_k: int = MISSING
    batching: ServeBatchingConf = field(default_factory=ServeBatchingConf)
    deployment: ServeDeploymentConf = field(default_factory=ServeDeploymentConf)
    accelerator: ServeAcceleratorConf = field(default_factory=ServeAcceleratorConf)
    inputs: ServeInputsConf = field(default_factory=ServeInputsConf)
    auth: ServeAuthConf = field(default_factory=ServeAuthConf)
    ingress: ServeIngressConf = field(default_factory=ServeIngressConf)
    # Block after deploying (auto: when this process started Ray, which dies with it).
    block: str = MISSING
    # Drill knob: versions whose predictions raise (to test that a failing shadow is harmless).
    chaos_fail_versions: list[str] = MISSING
    # Train the configured model first when the registry has no version yet (make run).
    train_if_empty: bool = MISSING


@dataclass
class PredictConf:
    # A folder of images (searched recursively) or a snapshot manifest.jsonl.
    input: str | None = MISSING
    # A version id or alias.
    version: str = MISSING
    output: str | None = MISSING
    top_k: int = MISSING
    batch_size: int = MISSING
    # Actors in the pool, each holding one copy of the extended model.
    concurrency: int = MISSING
    num_cpus_per_actor: float = MISSING


@dataclass
class DeployStorageConf:
    # The PersistentVolumeClaim (ReadWriteMany) every pod mounts at mount_path.
    claim: str = MISSING
    mount_path: str = MISSING
    capacity: str = MISSING
    # None: the cluster's default StorageClass.
    storage_class: str | None = MISSING


@dataclass
class DeployConf:
    out_dir: str | None = MISSING
    # The platform's image (the Dockerfile built FROM base_image or base_image_gpu).
    image: str = MISSING
    base_image: str = MISSING
    base_image_gpu: str = MISSING
    namespace: str = MISSING
    # The address Serve binds in the cluster (serve.host there): what the serve config and
    # RayService carry, and what serve.auth's "keys required off loopback" rule is judged on.
    serve_host: str = MISSING
    head_cpus: int = MISSING
    head_memory: str = MISSING
    worker_cpus: int = MISSING
    worker_memory: str = MISSING
    worker_gpus: int = MISSING
    min_workers: int = MISSING
    max_workers: int = MISSING
    storage: DeployStorageConf = field(default_factory=DeployStorageConf)
    # gitops.repo of the pipeline RayJob (a checkout on the shared volume).
    gitops_repo: str = MISSING
    sync: bool = MISSING  # a +mode=sync sidecar on the RayService's head pod


@dataclass
class CaptureConf:
    enabled: bool = MISSING
    root: str = MISSING
    # Records reach storage within this interval: the most a killed process can lose.
    flush_interval_s: float = MISSING
    # Fraction of requests whose input image is stored (0: none; images are personal data).
    sample_images: float = MISSING
    # Store the image of a request that gets feedback (from a bounded in-memory cache), so
    # labelled production data can be trained on (data=captured).
    store_feedback_images: bool = MISSING
    image_cache: int = MISSING  # at most this many images, and image_cache_mb MB, per ingress replica
    image_cache_mb: float = MISSING
    # Recent request ids kept in memory for /feedback; older ones are looked up in storage.
    index_size: int = MISSING
    # Feedback for a request served longer ago than this is refused (422 feedback_window_closed).
    lookup_days: int = MISSING


@dataclass
class MonitorQualityConf:
    window: int = MISSING
    min_labels: int = MISSING
    min_accuracy: float = MISSING


@dataclass
class MonitorAlertsConf:
    path: str = MISSING
    action: str = MISSING
    min_consecutive: int = MISSING
    cooldown_s: float = MISSING
    trigger_dir: str = MISSING
    retrain_command: list[str] = MISSING
    # One alert storm starts one pipeline: no new start within this many seconds.
    retrain_cooldown_s: float = MISSING
    # More labels than this from one key within the interval raise a feedback_flood alert
    # (logged, never a retrain).
    feedback_flood_labels: int = MISSING
    feedback_flood_interval_s: float = MISSING


@dataclass
class MonitorReportConf:
    since: str | None = MISSING  # ISO time, a date, or a duration like 24h / 7d
    until: str | None = MISSING
    out_dir: str | None = MISSING
    versions: list[str] = MISSING


@dataclass
class MonitorConf:
    enabled: bool = MISSING
    window_size: int = MISSING
    interval_s: float = MISSING
    # Under heavy traffic score only the newest windows, at most this many per version per
    # poll (the rest are counted as skipped); 0 scores every window.
    max_windows_per_poll: int = MISSING
    # The per-window false-alarm budget of the batch detectors together (Bonferroni).
    p_val_budget: float = MISSING
    # name -> {_target_: ..., ...}; built with hydra.utils.instantiate.
    detectors: Any = MISSING
    num_cpus: float = MISSING
    # The monitor runs at this nice value, below the request path.
    nice: int = MISSING
    capture: CaptureConf = field(default_factory=CaptureConf)
    quality: MonitorQualityConf = field(default_factory=MonitorQualityConf)
    alerts: MonitorAlertsConf = field(default_factory=MonitorAlertsConf)
    report: MonitorReportConf = field(default_factory=MonitorReportConf)


PIPELINE_STEPS = ("snapshot", "validate", "split", "train", "tune", "evaluate", "gate", "register", "propose")


@dataclass
class PipelineEvaluateConf:
    # Extra slices the candidate and production are both evaluated on: "captured" (the
    # test split's production images) and "drifted" (the drifted synthetic variant).
    slices: list[str] = MISSING
    drifted_images_per_class: int = MISSING
    drift: DriftConf = field(default_factory=DriftConf)


@dataclass
class PipelineConf:
    # The steps, in order. `tune` in place of `train` runs the search in conf/train/tune.
    steps: list[str] = MISSING
    # Skip a step whose inputs are unchanged and reuse its output.
    cache: bool = MISSING
    evaluate: PipelineEvaluateConf = field(default_factory=PipelineEvaluateConf)
    # The canary weight a blessed candidate is proposed at.
    canary_weight: int = MISSING
    # Consume the monitor's trigger files (written by alerts with action=retrain).
    trigger_dir: str = MISSING


@dataclass
class GitOpsConf:
    # The serve file a proposal edits, relative to the repository's root.
    serve_file: str = MISSING
    # The configuration repository: a local checkout or any URL git can fetch. A checkout
    # gets each proposal's branch itself (through a temporary worktree, so its files are
    # untouched); null: proposals are only written under paths.root/proposals.
    repo: str | None = MISSING
    branch: str = MISSING  # watched by +mode=sync; the base of proposals
    conf_dir: str = MISSING  # Hydra's config directory inside the repository
    branch_prefix: str = MISSING
    remote: str | None = MISSING  # where proposal branches are pushed; null: not pushed
    pr_command: str | None = MISSING  # forge CLI template that opens the pull request
    interval_s: float = MISSING
    self_heal: bool = MISSING
    overrides: list[str] = MISSING
    status_path: str = MISSING
    once: bool = MISSING
    actor: bool = MISSING


@dataclass
class RolloutConf:
    # Canary weight steps; the last (100) completes the promotion.
    steps: list[int] = MISSING
    window: str = MISSING
    min_requests: int = MISSING  # per version, before any decision (else: hold)
    min_feedback: int = MISSING  # labels per version before accuracy counts
    min_shadow_pairs: int = MISSING
    # Bounds on the decision's two errors over one canary's max_looks decisions.
    false_promotion: float = MISSING
    false_rollback: float = MISSING
    max_looks: int = MISSING
    error_margin: float = MISSING  # absolute error-rate difference
    latency_margin: float = MISSING  # latency ratio, > 1
    accuracy_margin: float = MISSING  # absolute accuracy difference
    min_agreement: float = MISSING
    # Apply the proposed weights to the running deployment (else only propose).
    apply: bool = MISSING
    auto: bool = MISSING  # step every interval_s until promotion or rollback
    interval_s: float = MISSING
    apply_via: str = MISSING  # git | direct


@dataclass
class Config:
    paths: PathsConf = field(default_factory=PathsConf)
    ray: RayConf = field(default_factory=RayConf)
    data: DataConf = field(default_factory=DataConf)
    # Built through `_target_`; checked by instantiating it, so left untyped here.
    model: Any = MISSING
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
    seed: int = MISSING


def register_configs() -> None:
    if not OmegaConf.has_resolver("mlp.join"):
        OmegaConf.register_new_resolver("mlp.join", lambda items: "+".join(str(i) for i in items))
    if not OmegaConf.has_resolver("mlp.trusted_labellers"):
        # data.captured.trusted_keys: the ids of serve.auth.keys marked trusted_labeller, so a
        # key is marked once (an interpolation cannot filter a list).
        OmegaConf.register_new_resolver("mlp.trusted_labellers", lambda keys: [
            str(k["id"]) for k in keys or [] if k.get("trusted_labeller")])
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="data", name="base_data", node=DataConf)
    cs.store(group="train", name="base_train", node=TrainConf)
    cs.store(group="serve", name="base_serve", node=ServeConf)
    cs.store(group="monitor", name="base_monitor", node=MonitorConf)
    cs.store(group="pipeline", name="base_pipeline", node=PipelineConf)


