"""The data-quality report (JSON, Markdown, PNG) and the quality gates."""

from __future__ import annotations

import io
import statistics
from collections import Counter, defaultdict
from typing import Any

from mlplatform import storage
from mlplatform.data.snapshot import SPLITS, Selection


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "max": 0, "mean": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": round(statistics.fmean(values), 2)}


def cross_split_duplicates(kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of kept images with the same perceptual hash whose members sit in different splits."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in kept:
        if r.get("dhash"):
            groups[r["dhash"]].append(r)
    out = []
    for h, group in sorted(groups.items()):
        splits = {r["split"] for r in group}
        if len(splits) > 1:
            out.append({"dhash": h, "splits": sorted(splits), "files": sorted(r["rel"] for r in group)})
    return out


def build_report(records: list[dict[str, Any]], sel: Selection, skipped: dict[str, int],
                 previous_labels: list[str] | None, fractions: dict[str, float]) -> dict[str, Any]:
    per_species: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in (*SPLITS, "total")})
    for r in sel.kept:
        per_species[r["species"]][r["split"]] += 1
        per_species[r["species"]]["total"] += 1
    for r in sel.unreadable:
        per_species[r["species"]].setdefault("unreadable", 0)
        per_species[r["species"]]["unreadable"] += 1
    totals = [v["total"] for v in per_species.values() if v["total"] > 0]
    split_totals = {s: sum(v[s] for v in per_species.values()) for s in SPLITS}
    n_kept = len(sel.kept)
    species = sorted(k for k, v in per_species.items() if v["total"] > 0)
    report: dict[str, Any] = {
        "num_files": len(records),
        "num_images": n_kept,
        "num_species": len(species),
        "skipped": skipped,
        "splits": {
            "target": fractions,
            "counts": split_totals,
            "actual": {s: round(split_totals[s] / n_kept, 4) if n_kept else 0.0 for s in SPLITS},
            "sticky_from_previous_snapshot": sel.sticky,
        },
        "per_species": {k: dict(per_species[k]) for k in sorted(per_species)},
        "imbalance": {
            "min_per_species": min(totals) if totals else 0,
            "max_per_species": max(totals) if totals else 0,
            "max_over_min": round(max(totals) / min(totals), 3) if totals else 0.0,
            "coefficient_of_variation": round(statistics.pstdev(totals) / statistics.fmean(totals), 4)
            if totals else 0.0,
        },
        "unreadable": {
            "count": len(sel.unreadable),
            "fraction": round(len(sel.unreadable) / len(records), 6) if records else 0.0,
            "files": [{"file": r["rel"], "error": r["error"]} for r in sel.unreadable],
        },
        "duplicates": {
            "exact_within_species": [{"file": r["rel"], "duplicate_of": r["duplicate_of"]} for r in sel.duplicates],
            "label_conflicts": [{"file": r["rel"], "species_seen": r["species_seen"]} for r in sel.label_conflicts],
            "cross_split": cross_split_duplicates(sel.kept),
        },
        "capped_by_max_per_class": sel.capped,
        "images": {
            "width": _stats([r["width"] for r in sel.kept]),
            "height": _stats([r["height"] for r in sel.kept]),
            "bytes": _stats([r["size"] for r in sel.kept]),
            "modes": dict(Counter(r["mode"] for r in sel.kept).most_common()),
            "formats": dict(Counter(r["format"] for r in sel.kept).most_common()),
            "sizes_top5": {f"{w}x{h}": c for (w, h), c in
                           Counter((r["width"], r["height"]) for r in sel.kept).most_common(5)},
        },
    }
    if previous_labels is not None:
        report["species_changes"] = {
            "added": sorted(set(species) - set(previous_labels)),
            "removed": sorted(set(previous_labels) - set(species)),
        }
    else:
        report["species_changes"] = None
    return report


def check_gates(report: dict[str, Any], quality: Any) -> list[dict[str, Any]]:
    """Every gate with its verdict; the job fails when any has passed=False."""
    gates = []
    per = report["per_species"]
    few = {k: v["total"] for k, v in per.items() if v["total"] < quality.min_images_per_class}
    gates.append({"gate": "min_images_per_class", "threshold": quality.min_images_per_class,
                  "passed": not few,
                  "message": f"{len(few)} species below {quality.min_images_per_class} images: "
                             + ", ".join(f"{k}={v}" for k, v in sorted(few.items())[:10]) if few else "ok"})
    thin = {f"{k}/{s}": v[s] for k, v in per.items() if v["total"] > 0 for s in SPLITS
            if v[s] < quality.min_images_per_split}
    gates.append({"gate": "min_images_per_split", "threshold": quality.min_images_per_split,
                  "passed": not thin,
                  "message": f"{len(thin)} species/split pairs below {quality.min_images_per_split}: "
                             + ", ".join(f"{k}={v}" for k, v in sorted(thin.items())[:10]) if thin else "ok"})
    frac = report["unreadable"]["fraction"]
    gates.append({"gate": "max_unreadable_fraction", "threshold": quality.max_unreadable_fraction,
                  "passed": frac <= quality.max_unreadable_fraction,
                  "message": f"unreadable fraction {frac:.4f} > {quality.max_unreadable_fraction}"
                  if frac > quality.max_unreadable_fraction else "ok"})
    cross = len(report["duplicates"]["cross_split"])
    gates.append({"gate": "max_cross_split_duplicates", "threshold": quality.max_cross_split_duplicates,
                  "passed": cross <= quality.max_cross_split_duplicates,
                  "message": f"{cross} duplicate groups span splits (first: "
                             f"{report['duplicates']['cross_split'][0]['files']})"
                  if cross > quality.max_cross_split_duplicates else "ok"})
    gates.append({"gate": "not_empty", "threshold": 1, "passed": report["num_images"] > 0,
                  "message": "no readable images found" if report["num_images"] == 0 else "ok"})
    return gates


def class_counts_png(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["per_species"])
    width = max(6.0, 0.14 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.0), dpi=100)
    bottom = [0] * len(names)
    for split, color in zip(SPLITS, ("#4c72b0", "#dd8452", "#55a868"), strict=True):
        vals = [report["per_species"][n][split] for n in names]
        ax.bar(range(len(names)), vals, bottom=bottom, color=color, label=split, width=0.85)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6 if len(names) > 30 else 8)
    ax.set_ylabel("images")
    ax.set_title(f"Images per species and split ({report['num_images']} images, {report['num_species']} species)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def to_markdown(report: dict[str, Any], gates: list[dict[str, Any]], snapshot_id: str) -> str:
    lines = [f"# Data quality report: snapshot {snapshot_id}", ""]
    lines += ["## Gates", "", "| gate | threshold | result | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {g['gate']} | {g['threshold']} | {'PASS' if g['passed'] else 'FAIL'} | {g['message']} |"
              for g in gates]
    sp = report["splits"]
    lines += ["", "## Summary", "",
              f"- files found: {report['num_files']}; images kept: {report['num_images']}; "
              f"species: {report['num_species']}",
              f"- skipped: {report['skipped']}",
              f"- split counts: {sp['counts']} (target {sp['target']}, actual {sp['actual']}; "
              f"{sp['sticky_from_previous_snapshot']} kept an earlier snapshot's split)",
              f"- imbalance: {report['imbalance']}",
              f"- unreadable: {report['unreadable']['count']} ({report['unreadable']['fraction']:.2%})",
              f"- exact duplicates (same species): {len(report['duplicates']['exact_within_species'])}; "
              f"label conflicts: {len(report['duplicates']['label_conflicts'])}; "
              f"cross-split near-duplicates: {len(report['duplicates']['cross_split'])}",
              f"- dropped by max_per_class: {report['capped_by_max_per_class']}",
              f"- image width {report['images']['width']}, height {report['images']['height']}",
              f"- colour modes {report['images']['modes']}; formats {report['images']['formats']}"]
    ch = report["species_changes"]
    if ch is None:
        lines.append("- species changes: first snapshot of this dataset")
    else:
        lines.append(f"- species added since the previous snapshot: {ch['added'] or 'none'}; "
                     f"removed: {ch['removed'] or 'none'}")
    lines += ["", "![class counts](class_counts.png)", "", "## Per species", "",
              "| species | train | val | test | total |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['train']} | {v['val']} | {v['test']} | {v['total']} |"
              for k, v in report["per_species"].items()]
    if report["unreadable"]["files"]:
        lines += ["", "## Unreadable files", ""]
        lines += [f"- `{f['file']}`: {f['error']}" for f in report["unreadable"]["files"][:50]]
    return "\n".join(lines) + "\n"


def write(snapshot_dir: str, report: dict[str, Any], gates: list[dict[str, Any]], snapshot_id: str) -> dict[str, str]:
    paths = {"report_json": storage.join(snapshot_dir, "report.json"),
             "report_md": storage.join(snapshot_dir, "report.md"),
             "report_png": storage.join(snapshot_dir, "class_counts.png")}
    storage.write_json(paths["report_json"], {**report, "gates": gates})
    storage.write_text(paths["report_md"], to_markdown(report, gates, snapshot_id))
    storage.write_bytes(paths["report_png"], class_counts_png(report))
    return paths
