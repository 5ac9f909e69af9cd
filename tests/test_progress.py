"""What a person sees on the terminal: one line per epoch, trial report and pipeline step,
and none of Ray's own per-report lines at the default log level."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlplatform import progress

from .conftest import run_cli


@pytest.mark.parametrize(("seconds", "text"), [(4.21, "4.2 s"), (15.4, "15 s"), (120, "2 min"),
                                               (125.4, "2 min 5 s"), (3780, "1 h 3 min")])
def test_durations_read_like_a_person_writes_them(seconds: float, text: str) -> None:
    assert progress.duration(seconds) == text


def test_epoch_lines_show_metrics_pace_and_time_left() -> None:
    clock = progress.EpochClock(12)
    first = clock.line({"epoch": 0, "train/loss": 2.345, "val/loss": 2.0, "val/acc": 0.1, "epoch_seconds": 14.6},
                       now=100.0)
    assert first == "epoch 1/12  train/loss 2.35  val/loss 2.00  val/acc 0.10  15 s/epoch  ETA 2 min 41 s"
    clock.line({"epoch": 1, "train/loss": 1.5}, now=115.0)
    fourth = clock.line({"epoch": 3, "train/loss": 1.31, "val/acc": 0.71}, now=145.0)
    assert fourth == "epoch 4/12  train/loss 1.31  val/acc 0.71  15 s/epoch  ETA 2 min"
    last = clock.line({"epoch": 11, "train/loss": 0.5}, now=265.0)
    assert last == "epoch 12/12  train/loss 0.50  15 s/epoch"  # nothing left to wait for


def test_a_report_for_an_epoch_already_seen_says_the_run_resumed() -> None:
    clock = progress.EpochClock(8)
    for k in range(4):
        clock.line({"epoch": k, "epoch_seconds": 2.0}, now=10.0 + 2 * k)
    line = clock.line({"epoch": 2, "epoch_seconds": 3.0}, prefix="", now=60.0)
    assert line.startswith("epoch 3/8") and line.endswith("(resumed from a checkpoint)")
    assert "3.0 s/epoch" in line  # the restart's start-up does not count as an epoch's time


def test_pipeline_steps_say_when_they_run_end_or_come_from_the_cache(capsys) -> None:
    steps = progress.Steps(["snapshot", "train", "register"])
    steps.finished("snapshot", "cached", 0.25)
    steps.started("train")
    steps.finished("train", "ran", 131)
    steps.started("register")
    steps.finished("register", "failed", 2)
    assert capsys.readouterr().err.splitlines() == [
        "step 1/3  snapshot  cached  0.2 s",
        "step 2/3  train     running",
        "step 2/3  train     done  2 min 11 s",
        "step 3/3  register  running",
        "step 3/3  register  failed  2.0 s",
    ]


def test_tune_trials_get_a_line_per_epoch_and_one_when_they_end(capsys) -> None:
    from mlplatform.training.progress import TrialLines

    lines = TrialLines(total_epochs=3, num_trials=2, metric="val/acc")
    a = SimpleNamespace(trial_id="a_00000", last_result={})
    b = SimpleNamespace(trial_id="b_00001", last_result={})
    for k in range(2):
        for trial in (a, b):
            trial.last_result = {"epoch": k, "train/loss": 1.0 - k / 10, "val/acc": 0.5 + k / 10,
                                 "epoch_seconds": 4.0}
            lines.on_trial_result(iteration=k, trials=[a, b], trial=trial, result=trial.last_result)
    lines.on_trial_complete(iteration=2, trials=[a, b], trial=b)  # the scheduler stopped it
    a.last_result = {**a.last_result, "epoch": 2, "val/acc": 0.8, "output": "/x/a.npz"}
    lines.on_trial_result(iteration=3, trials=[a, b], trial=a, result=a.last_result)  # the return: no line
    lines.on_trial_complete(iteration=3, trials=[a, b], trial=a)
    out = capsys.readouterr().err.splitlines()
    assert out[0].startswith("trial 1/2 a_00000  epoch 1/3  train/loss 1.00  val/acc 0.50  4.0 s/epoch")
    assert out[3].startswith("trial 2/2 b_00001  epoch 2/3  train/loss 0.90  val/acc 0.60")
    assert out[4:] == ["trial 2/2 b_00001  stopped by the scheduler after 2 epochs  val/acc 0.60  "
                       "(1/2 trials done)",
                       "trial 1/2 a_00000  finished after 3 epochs  val/acc 0.80  (2/2 trials done)"]


@pytest.mark.ray
@pytest.mark.slow
def test_cli_training_shows_one_line_per_epoch_and_not_rays_report_lines(tmp_path: Path) -> None:
    epochs = 3
    proc = run_cli("+mode=train", "+experiment=smoke", f"paths.root={tmp_path}", "logger=none",
                   f"train.epochs={epochs}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    shown = [line for line in proc.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in shown] == [f"{k}/{epochs}" for k in range(1, summary["epochs_run"] + 1)]
    for line in shown:
        assert re.fullmatch(r"epoch \d+/3  train/loss \d+\.\d\d  val/loss \d+\.\d\d  val/acc \d\.\d\d  "
                            r"[\d.]+ s/epoch(  ETA [\d.]+ s)?", line), line
    assert "ETA" not in shown[-1] or summary["epochs_run"] < epochs
    output = proc.stdout + proc.stderr
    for noise in ("Reporting training result", "TrainingReport(", "Checkpoint successfully created",
                  "Starting execution of Dataset"):
        assert noise not in output, noise
