"""Ray Train across the worker nodes of a real multi-node cluster (mlplatform.localcluster):
one worker per node, checkpoints on the shared storage under paths.root, and a worker node
SIGKILLed mid-run that the run survives by resuming from its last checkpoint.

The cluster's nodes are all on this machine, so the local filesystem under paths.root plays
the ReadWriteMany volume every node mounts there in Kubernetes. Each worker node has 2 CPUs:
one for a training worker, one for Ray Data, which rebuilds the dataset blocks the killed
node held. STRICT_SPREAD keeps one worker per node, as one GPU node holds one GPU worker. The
killed node is replaced, as KubeRay replaces a worker pod, and the fixed-size group of 2
resumes on the survivor and the replacement.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlplatform.errors import ConfigError

from .conftest import ROOT, compose, wait_for

EPOCHS = 8  # the smoke experiment's
KILL_AFTER = 2  # epochs whose checkpoints Ray Train has registered when the node is killed
TRAIN = ("+mode=train", "+experiment=smoke", "logger=none", "train.scaling.num_workers=2",
         # One worker per node or none: the restarted group waits for a second node.
         "train.scaling.placement_strategy=STRICT_SPREAD", "train.scaling.cpus_per_worker=1",
         "train.max_failures=2",
         # Both runs train every epoch, so that their accuracies compare like for like.
         "train.early_stopping.patience=100")


def test_placement_strategy_is_validated() -> None:
    with pytest.raises(ConfigError) as info:
        compose("+mode=train", "train.scaling.placement_strategy=everywhere")
    assert str(info.value).startswith("train.scaling.placement_strategy=everywhere")


@pytest.fixture(scope="module")
def cluster():
    from mlplatform.localcluster import LocalCluster

    with LocalCluster(workers=2, worker_cpus=2, high_throughput=False) as c:
        yield c


class Driver:
    """`python run.py +mode=train ... ray.address=<cluster>` (a driver on the head's node), its
    stderr read as it comes: the epoch lines, each with the time it arrived."""

    def __init__(self, cluster, root: Path) -> None:
        self.cluster = cluster
        self.started = time.monotonic()
        # stdout to a file: only the reader thread reads the stderr pipe, so no line is lost to
        # another reader.
        self.out = (root / "driver.stdout").open("w+")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *TRAIN, f"ray.address={cluster.address}",
                                      f"paths.root={root}"], cwd=ROOT, stdout=self.out,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **cluster.client_env()})
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line))

    def epoch_line(self, epoch: int) -> float | None:
        """When the driver printed `epoch <epoch>/N`: Ray Train calls the callback that sends it
        after registering that epoch's checkpoint."""
        return next((t for t, line in self.lines if line.startswith(f"epoch {epoch}/")), None)

    def finish(self, timeout: float = 240) -> tuple[dict, float]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # What the cluster was waiting on (pending placement groups, free CPUs per node)
            # and the driver's last words: a hang on CI's loaded cores is otherwise a bare timeout.
            status = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status", "-v",
                                     f"--address={self.cluster.address}"], capture_output=True, text=True,
                                    timeout=60, env={**os.environ, **self.cluster.client_env()})
            self.proc.kill()
            self._reader.join(timeout=10)
            pytest.fail(f"training did not finish in {timeout:g} s\n--- ray status\n{status.stdout[-3000:]}"
                        f"\n--- driver stderr\n{''.join(line for _, line in self.lines)[-6000:]}")
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(timeout=10)
        seconds = time.monotonic() - self.started
        self.out.seek(0)
        out = self.out.read()
        assert self.proc.returncode == 0, "".join(line for _, line in self.lines)[-4000:]
        return json.loads(out.strip().splitlines()[-1]), seconds


def _workers_by_node(cluster, summary: dict) -> list[str]:
    names = {node_id: name for name, node_id in cluster.node_ids().items()}
    return [names.get(n, f"gone:{n[:8]}") for n in summary["worker_nodes"]]


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> tuple[dict, float]:
    return Driver(cluster, tmp_path_factory.mktemp("cluster-train")).finish()


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_train_one_on_each_worker_node(cluster, uninterrupted) -> None:
    summary, seconds = uninterrupted
    assert sorted(_workers_by_node(cluster, summary)) == ["worker-1", "worker-2"]
    assert summary["epochs_run"] == EPOCHS and summary["resumed_from_epoch"] is None
    # The checkpoints are on the shared storage, under paths.root.
    assert glob.glob(str(Path(summary["ray_train_path"]) / "checkpoint_*" / "state.pt"))
    print(f"\nuninterrupted: {seconds:.1f} s, test/acc {summary['metrics']['test/acc']:.3f}")


@pytest.mark.ray
@pytest.mark.slow
def test_node_killed_mid_training_resumes_from_its_checkpoint(cluster, uninterrupted, tmp_path: Path) -> None:
    base, base_seconds = uninterrupted
    driver = Driver(cluster, tmp_path)
    try:
        wait_for(lambda: driver.epoch_line(KILL_AFTER) or driver.proc.poll() is not None, timeout=180,
                 message=lambda: "".join(line for _, line in driver.lines)[-3000:])
        assert driver.proc.poll() is None, "the run ended before a node could be killed"
        killed_id = cluster.node_ids()["worker-1"]
        killed_at = time.monotonic()
        cluster.kill_worker(1)
        # A replacement node joins, as KubeRay replaces a worker pod: a fresh one, a new name.
        cluster.add_worker(wait=False)
    except BaseException:
        driver.proc.kill()
        raise
    summary, seconds = driver.finish()
    next_epoch = driver.epoch_line(KILL_AFTER + 1)
    acc, base_acc = summary["metrics"]["test/acc"], base["metrics"]["test/acc"]
    print(f"\nkilled worker-1 {killed_at - driver.started:.1f} s into the run, after epoch {KILL_AFTER}; "
          f"resumed from epoch {summary['resumed_from_epoch']}; the next epoch ended "
          f"{(next_epoch or killed_at) - killed_at:.1f} s after the kill; {seconds:.1f} s against "
          f"{base_seconds:.1f} s uninterrupted: {seconds - base_seconds:.1f} s lost; "
          f"test/acc {acc:.3f} against {base_acc:.3f}")

    # Resumed from the checkpoint of the last epoch reported before the kill (or a later one),
    # not restarted from scratch, and trained to the end.
    assert summary["resumed_from_epoch"] is not None and summary["resumed_from_epoch"] >= KILL_AFTER
    assert summary["epochs_run"] == EPOCHS
    meta = _registry(tmp_path).get(summary["version"])
    history = meta["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    # With the weights it resumed from: the first epoch after the restart already trains at a
    # loss well below a fresh model's (about 1.7 here against about 1.0).
    assert history[summary["resumed_from_epoch"]]["train/loss"] < 0.8 * history[0]["train/loss"]
    # The restarted group is again one worker per node: on the survivor and the replacement.
    assert killed_id not in summary["worker_nodes"]
    assert sorted(_workers_by_node(cluster, summary)) == ["worker-2", "worker-3"]
    # Within noise of the uninterrupted run. The two runs differ after the restart (the
    # augmentation's random stream starts over), so they are two models of the same quality
    # measured on the same n test images: 3 standard errors of the difference of two
    # accuracies, each a binomial proportion over n (0.2 at 0.85 on the smoke data's 44 images).
    n = int(meta["data_snapshot"]["splits"]["test"])
    tolerance = 3 * math.sqrt(2 * base_acc * (1 - base_acc) / n)
    assert abs(acc - base_acc) <= tolerance, (acc, base_acc, tolerance, n)


def _registry(root: Path):
    from mlplatform.registry.store import Registry

    return Registry(str(root / "registry"), "species-classifier")
