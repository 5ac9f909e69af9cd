"""Epoch lines on the driver's terminal for Ray Train runs and Tune trials.

Ray Train calls its callbacks in the TrainController actor, whose output Ray would prefix
and interleave with every other process's; `EpochLines` instead passes each report's
metrics through a small queue actor to a thread of the driver, which prints them. Tune
calls its callbacks in the driver already.
"""

from __future__ import annotations

import threading
from typing import Any

import ray
import ray.train
import ray.tune
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mlplatform import progress


class _Forward(ray.train.UserCallback):
    """In the TrainController: every report's metrics, on to the driver."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        # Rank 0's metrics: the training loop all-reduces them, so every rank reports the same.
        self.queue.put({k: v for k, v in metrics[0].items() if isinstance(v, int | float | str)})


class EpochLines:
    """`with EpochLines(epochs) as lines:` around `trainer.fit()`, with `lines.callback` in
    the trainer's RunConfig: one line per epoch, printed here as the reports arrive."""

    def __init__(self, total_epochs: int, prefix: str = "") -> None:
        self.clock = progress.EpochClock(total_epochs)
        self.prefix = prefix
        # On the driver's node, as Ray Train's controller is: a worker node that dies takes
        # its worker with it, never the epoch lines.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.callback = _Forward(self.queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="epoch-lines", daemon=True)

    def __enter__(self) -> EpochLines:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.queue.shutdown()

    def _drain(self) -> None:
        while True:
            try:
                metrics = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone (Ray shut down): nothing more will come
                return
            progress.say(self.clock.line(metrics, self.prefix))


class TrialLines(ray.tune.Callback):
    """Tune calls this in the driver: a line per trial report, and when a trial ends."""

    def __init__(self, total_epochs: int, num_trials: int, metric: str) -> None:
        self.total_epochs, self.num_trials, self.metric = total_epochs, num_trials, metric
        self.clocks: dict[str, progress.EpochClock] = {}
        self.order: dict[str, int] = {}
        self.ended = 0

    def _prefix(self, trial: Any) -> str:
        n = self.order.setdefault(trial.trial_id, len(self.order) + 1)
        return f"trial {n}/{self.num_trials} {trial.trial_id}  "

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" not in result or "output" in result:  # the trial's return repeats its last epoch
            return
        clock = self.clocks.setdefault(trial.trial_id, progress.EpochClock(self.total_epochs))
        progress.say(clock.line(result, self._prefix(trial)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended += 1
        last = trial.last_result or {}
        how = "finished" if "output" in last else "stopped by the scheduler"
        epochs = int(last["epoch"]) + 1 if "epoch" in last else 0
        progress.say(f"{self._prefix(trial)}{how} after {epochs} epochs  "
                     f"{progress.metrics_text(last, (self.metric,))}  ({self.ended}/{self.num_trials} trials done)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended += 1
        progress.say(f"{self._prefix(trial)}failed  ({self.ended}/{self.num_trials} trials done; "
                     f"its error is in the summary)")
