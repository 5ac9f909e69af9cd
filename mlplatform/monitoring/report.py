"""`+mode=monitor`: an offline report over a time range of captured data.

The same detectors as the live monitor are replayed over the captured windows of each
version (reference from the registry), so the report shows what the monitor saw, and can
be re-run with other detectors or windows. It never writes to the alerts log.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mlplatform import storage
from mlplatform.capture.schema import ANONYMOUS
from mlplatform.capture.store import CaptureStore
from mlplatform.config import parse_since
from mlplatform.monitoring import detectors as D
from mlplatform.monitoring.alerts import read_alerts
from mlplatform.monitoring.windows import VersionMonitor, WindowResult, load_reference

log = logging.getLogger(__name__)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _drift_plot(path: str, version: str, windows: list[WindowResult]) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    x = [datetime.fromtimestamp(w.end_ts, UTC) for w in windows]
    names = [r.detector for r in windows[0].results] if windows else []
    for i, name in enumerate(names):
        rs = [w.results[i] for w in windows]
        if rs[0].p_value is not None:
            line = ax1.plot(x, [max(r.p_value, 1e-6) for r in rs], marker="o", ms=3, label=f"{name} p-value")[0]
            ax1.axhline(rs[0].threshold, ls=":", lw=0.8, color=line.get_color())
        else:
            ax2.plot(x, [r.distance / r.threshold if r.threshold else 0 for r in rs], marker="o", ms=3,
                     label=f"{name} statistic / threshold")
    ax1.set_yscale("log")
    ax1.set_ylabel("p-value (log)")
    ax1.set_title(f"{version}: drift per window (dotted: thresholds)")
    ax2.axhline(1.0, color="red", ls="--", lw=0.8)
    ax2.set_ylabel("online: statistic / threshold")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    storage.write_bytes(path, _png(fig))
    plt.close(fig)


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _species_plot(path: str, version: str, labels: list[str], ref: np.ndarray, cur: np.ndarray) -> None:
    plt = _plt()
    order = np.argsort(-(ref + cur))[:30]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    xs = np.arange(len(order))
    ax.bar(xs - 0.2, ref[order], width=0.4, label="reference (validation)")
    ax.bar(xs + 0.2, cur[order], width=0.4, label="captured")
    ax.set_xticks(xs, [labels[i] for i in order], rotation=70, fontsize=7)
    ax.set_ylabel("share of predictions")
    ax.set_title(f"{version}: predicted species")
    ax.legend(fontsize=8)
    fig.tight_layout()
    storage.write_bytes(path, _png(fig))
    plt.close(fig)


def _accuracy_plot(path: str, series: dict[str, list[tuple[float, float, int]]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for version, pts in series.items():
        ax.plot([datetime.fromtimestamp(t, UTC) for t, _, _ in pts], [a for _, a, _ in pts], marker="o",
                label=version)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy vs feedback")
    ax.set_title("Feedback accuracy over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    storage.write_bytes(path, _png(fig))
    plt.close(fig)


def _accuracy_series(rows: list[dict[str, Any]], bins: int = 10) -> list[tuple[float, float, int]]:
    if not rows:
        return []
    ts = np.array([r["feedback_ts"] for r in rows])
    ok = np.array([r["correct"] for r in rows], float)
    edges = np.linspace(ts.min(), ts.max() + 1e-6, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (ts >= lo) & (ts < hi)
        if m.any():
            out.append((float(ts[m].mean()), float(ok[m].mean()), int(m.sum())))
    return out


def run_monitor(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.monitor
    rep = m.report
    since = parse_since(rep.since).timestamp() if rep.since else None
    until = parse_since(rep.until).timestamp() if rep.until else None
    store = CaptureStore(m.capture.root)
    registry_root = storage.resolve_root(cfg.registry.root)
    out_dir = storage.resolve_root(rep.out_dir or storage.join(
        cfg.paths.root, "reports", f"monitor-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"))
    started = time.time()
    cols = ["request_id", "ts", "version", "role", "top1_index", "embedding"]
    preds = store.predictions(since=since, until=until, versions=list(rep.versions) or None, columns=cols)
    rows = [r for r in preds.to_pylist() if r["top1_index"] is not None and r["top1_index"] >= 0]
    labelled = store.labelled(since, until)
    alerts = read_alerts(storage.resolve_root(m.alerts.path), since, until)
    detectors_cfg = OmegaConf.to_container(m.detectors, resolve=True) if m.detectors else {}

    dets = ", ".join(f"{k} (`{v['_target_']}`)" for k, v in detectors_cfg.items() if v)
    lines = ["# Monitoring report", "",
             f"Captured data from {_iso(since) if since else 'the beginning'} to {_iso(until) if until else 'now'} "
             f"(UTC), under `{store.root}`. Window: {m.window_size} predictions per version. "
             f"Detectors: {dets}.", ""]
    summary_versions: dict[str, Any] = {}
    plots: list[str] = []
    versions = sorted({r["version"] for r in rows} | {r["version"] for r in labelled})
    if not versions:
        lines += ["No captured predictions in this range.", ""]
    lines += ["## Drift over time", ""]
    for version in versions:
        vrows = [r for r in rows if r["version"] == version]
        try:
            ref = load_reference(registry_root, cfg.registry.model_name, version)
        except Exception as exc:
            lines += [f"### {version}", "", f"No reference in the registry ({type(exc).__name__}: {exc}).", ""]
            summary_versions[version] = {"predictions": len(vrows), "error": str(exc)[:300]}
            continue
        vm = VersionMonitor(version, ref, D.build(detectors_cfg, m.p_val_budget), m.window_size)
        windows = vm.add(vrows)
        labels = ref["labels"]
        cur = np.bincount([r["top1_index"] for r in vrows if r["top1_index"] >= 0],
                          minlength=len(labels)).astype(float)
        cur = cur / max(cur.sum(), 1)
        refq = np.asarray(ref["frequencies"], float)
        tvd = float(0.5 * np.abs(cur - refq).sum()) if vrows else None
        vlab = [r for r in labelled if r["version"] == version]
        acc = float(np.mean([r["correct"] for r in vlab])) if vlab else None
        lines += [f"### {version}", "",
                  f"{len(vrows)} predictions, {len(windows)} full windows ({len(vm._ts)} left over), "
                  f"{sum(w.drift for w in windows)} with drift.", ""]
        if windows:
            p = storage.join(out_dir, f"drift-{version}.png")
            _drift_plot(p, version, windows)
            plots.append(p)
            lines += [f"![drift {version}](drift-{version}.png)", "",
                      "| window | end (UTC) | " + " | ".join(r.detector for r in windows[0].results) + " |",
                      "|---|---|" + "---|" * len(windows[0].results)]
            for w in windows:
                cells = [(f"p={r.p_value:.3g}" if r.p_value is not None else f"{r.distance:.3g}/{r.threshold:.3g}")
                         + (" **drift**" if r.is_drift else "") for r in w.results]
                lines.append(f"| {w.index} | {_iso(w.end_ts)} | " + " | ".join(cells) + " |")
            lines.append("")
        if vrows:
            p = storage.join(out_dir, f"species-{version}.png")
            _species_plot(p, version, labels, refq, cur)
            plots.append(p)
            lines += [f"Species distribution shift (total variation distance from the reference): "
                      f"**{tvd:.3f}**.", "", f"![species {version}](species-{version}.png)", ""]
        summary_versions[version] = {"predictions": len(vrows), "windows": len(windows),
                                     "drift_windows": sum(w.drift for w in windows), "species_tvd": tvd,
                                     "labelled": len(vlab), "feedback_accuracy": acc,
                                     "labelled_by_key": dict(Counter(r["key_id"] or ANONYMOUS for r in vlab))}

    lines += ["## Feedback accuracy", ""]
    series = {v: _accuracy_series([r for r in labelled if r["version"] == v]) for v in versions}
    series = {v: s for v, s in series.items() if s}
    if series:
        p = storage.join(out_dir, "feedback-accuracy.png")
        _accuracy_plot(p, series)
        plots.append(p)
        lines += ["| version | labelled | accuracy |", "|---|---|---|"]
        for v in versions:
            sv = summary_versions.get(v, {})
            if sv.get("labelled"):
                lines.append(f"| {v} | {sv['labelled']} | {sv['feedback_accuracy']:.3f} |")
        lines += ["", "![feedback accuracy](feedback-accuracy.png)", ""]
    else:
        lines += ["No feedback in this range.", ""]

    lines += ["## Alerts", ""]
    if alerts:
        lines += ["| time (UTC) | kind | version | detector | detail | action |", "|---|---|---|---|---|---|"]
        for a in alerts:
            detail = (a["detail"] if "detail" in a else  # an alert that states its own (gitops_*)
                      f"accuracy {a['accuracy']:.3f} < {a['threshold']}" if a["kind"] == "quality" else
                      f"{a['labels']} labels > {a['limit']} in {a['interval_s']:g} s"
                      if a["kind"] == "feedback_flood" else
                      f"p={a['p_value']:.3g}" if a.get("p_value") is not None else
                      f"{a['distance']:.3g} > {a['threshold']:.3g}")
            lines.append(f"| {_iso(a['ts'])} | {a['kind']} | {a['version']} | {a['detector']} | {detail} | "
                         f"{a['action']} |")
    else:
        lines.append("No alerts in this range.")
    report = storage.join(out_dir, "report.md")
    storage.write_text(report, "\n".join(lines) + "\n")
    return {"mode": "monitor", "report": report, "versions": summary_versions, "alerts": len(alerts),
            "predictions": len(rows), "labelled": len(labelled), "plots": plots,
            "seconds": round(time.time() - started, 2)}
