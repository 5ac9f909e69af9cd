"""The model card: generated from a version's registry entry, never written by hand."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def render(meta: dict[str, Any], version: str) -> str:
    m = meta.get("metrics", {})
    test = meta.get("test_summary", {})
    gate = meta.get("gate") or {}
    snap = meta.get("data_snapshot", {})
    per = test.get("per_class", {})
    train = meta.get("training", {})
    lines = [
        f"# Model card: {meta.get('model_name', 'model')} {version}",
        "",
        f"Generated from the registry entry on {datetime.now(UTC).isoformat(timespec='seconds')}; "
        "do not edit by hand.",
        "",
        "## Intended use",
        "",
        f"Classifies a still image of one animal into one of {len(meta.get('labels', []))} species and "
        "returns the top-k species with calibrated-looking scores. Intended for the images the training "
        "data represents (see below), behind the platform's API with drift monitoring on.",
        "",
        "## Out-of-scope use",
        "",
        "- Images of species not in the label map: the model always answers with a known species.",
        "- Images with several animals, drawings or heavy edits unlike the training data.",
        "- Any decision about people, or safety-critical use without human review.",
        "",
        "## Training data",
        "",
        f"- dataset: `{snap.get('name', '?')}`, snapshot `{str(snap.get('hash', '?'))[:12]}` "
        f"(manifest hash `{snap.get('hash', '?')}`)",
        f"- images: {snap.get('num_images', '?')} over {len(meta.get('labels', []))} species; "
        f"splits {snap.get('splits', '?')}",
        f"- preprocessing: {meta.get('preprocess', {})}",
        "",
        "## Training",
        "",
        f"- model: `{meta.get('config', {}).get('model', {}).get('_target_', '?')}` "
        f"({meta.get('config', {}).get('model', {}).get('name', '')})",
        f"- produced by: {meta.get('source', 'train')}; epochs run {train.get('epochs_run', '?')}, "
        f"best epoch {train.get('best_epoch', '?')}, early stopped: {train.get('early_stopped', '?')}",
        f"- workers: {meta.get('config', {}).get('train', {}).get('scaling', {})}",
        f"- code: git `{meta.get('git_commit') or 'unknown'}`",
        "",
        "## Metrics (test split)",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key in ("test/acc", "test/top5", "test/macro_f1", "test/ece", "test/nll", "test/num_samples"):
        if key in m:
            lines.append(f"| {key} | {m[key]:.4f} |" if isinstance(m[key], float) else f"| {key} | {m[key]} |")
    worst = test.get("worst_classes", [])
    lines += ["", "## Worst species (lowest recall)", ""]
    lines += [f"- {name}: recall {per[name]['recall']:.3f}, precision {per[name]['precision']:.3f} "
              f"({per[name]['support']} test images)" for name in worst if name in per]
    lines += ["", "## Calibration", "",
              f"Expected calibration error {m.get('test/ece', float('nan')):.4f} (15 equal-width bins). "
              "See `reliability.png`; scores are softmax outputs, not guaranteed probabilities.", "",
              "## Per species", "", "| species | precision | recall | f1 | support |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |"
              for n, s in sorted(per.items())]
    lines += ["", "## Promotion gate", "",
              f"Verdict: **{gate.get('verdict', 'not judged')}** against "
              f"{gate.get('baseline') or 'no production version (absolute thresholds only)'}.", ""]
    lines += [f"- {c['check']}: {'pass' if c['passed'] else 'FAIL'}: {c['reason']}" for c in gate.get("checks", [])]
    lines += ["", "## Known limitations", "",
              "- Trained and tested on one data snapshot; performance on drifted inputs (lighting, blur, "
              "noise, colour casts, new backgrounds) is lower; evaluate with `data=synthetic_drifted`.",
              "- Species with few training images have noisier recall (see the per-species table).",
              "- Confidence is not an out-of-distribution detector: rely on drift monitoring for that.", ""]
    return "\n".join(lines)
