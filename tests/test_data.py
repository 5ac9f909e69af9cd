"""The species data pipeline: generator, splits, Ray Data ingest, quality gates, snapshots."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mlplatform.data import snapshot, synthetic
from mlplatform.data.job import run_data
from mlplatform.errors import JobFailed

from .conftest import compose, run_cli

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _records(n_species: int, n: int, start: int = 0) -> list[dict]:
    rng = np.random.default_rng(start)
    out = []
    for s in range(n_species):
        for i in range(start, start + n):
            out.append({"rel": f"sp{s}/{i}.jpg", "species": f"sp{s}", "ok": True,
                        "sha256": rng.bytes(32).hex(), "dhash": "", "size": 1, "width": 8, "height": 8})
    return out


# ----------------------------------------------------------------------------- generator


def test_synthetic_is_deterministic_and_species_differ() -> None:
    a = np.asarray(synthetic.render(3, 7, 32, seed=0))
    b = np.asarray(synthetic.render(3, 7, 32, seed=0))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(synthetic.render(3, 8, 32, seed=0)))  # varies within a species
    styles = {synthetic.species_style(s, 0) for s in range(100)}
    assert len({(st.shape, round(st.hue, 3), st.texture) for st in styles}) == 100  # 100 distinct species


def test_drifted_variant_changes_the_pictures() -> None:
    base = np.asarray(synthetic.render(5, 1, 64), np.float32)
    for kind in ("brightness", "blur", "noise", "color_cast", "background"):
        drifted = np.asarray(synthetic.render(5, 1, 64, drift_kinds=[kind], drift_strength=0.8), np.float32)
        assert np.abs(drifted - base).mean() > 3.0, kind
    weak = np.asarray(synthetic.render(5, 1, 64, drift_kinds=["color_cast"], drift_strength=0.1), np.float32)
    strong = np.asarray(synthetic.render(5, 1, 64, drift_kinds=["color_cast"], drift_strength=0.9), np.float32)
    assert np.abs(strong - base).mean() > np.abs(weak - base).mean()  # strength is a dial


def test_species_names_extend_past_100() -> None:
    names = synthetic.species_names(205)
    assert len(set(names)) == 205 and names[0] == "aardvark" and names[100] == "aardvark_2"


# ----------------------------------------------------------------------------- splits


def test_splits_are_deterministic_stratified_and_stable_under_additions() -> None:
    recs = _records(10, 300)
    first = {r["sha256"]: r["split"] for r in snapshot.select(recs, FRACTIONS, "s").kept}
    again = {r["sha256"]: r["split"] for r in snapshot.select(list(reversed(recs)), FRACTIONS, "s").kept}
    assert first == again
    # Each species gets its share: within 4 standard deviations of the binomial expectation.
    per = Counter((r["species"], first[r["sha256"]]) for r in recs)
    for s in range(10):
        for split, f in FRACTIONS.items():
            sd = (300 * f * (1 - f)) ** 0.5
            assert abs(per[(f"sp{s}", split)] - 300 * f) < 4 * sd, (s, split)
    # Adding images never moves an image that was already placed.
    grown = recs + _records(12, 100, start=1000)
    later = {r["sha256"]: r["split"] for r in snapshot.select(grown, FRACTIONS, "s").kept}
    assert all(later[k] == v for k, v in first.items())


def test_previous_assignments_win_over_new_fractions() -> None:
    recs = _records(3, 200)
    before = {r["sha256"]: r["split"] for r in snapshot.select(recs, FRACTIONS, "s").kept}
    changed = snapshot.select(recs, {"train": 0.5, "val": 0.25, "test": 0.25}, "other-salt", previous=before)
    assert {r["sha256"]: r["split"] for r in changed.kept} == before
    assert changed.sticky == len(recs)


def test_max_per_class_keeps_every_split() -> None:
    sel = snapshot.select(_records(4, 400), FRACTIONS, "s", max_per_class=60)
    counts = Counter(r["species"] for r in sel.kept)
    assert set(counts.values()) == {60}
    assert {r["split"] for r in sel.kept} == {"train", "val", "test"}
    assert sel.capped == 4 * 340


# ----------------------------------------------------------------------------- the job, on Ray


def _tree(root: Path, species: int = 4, per: int = 30, size: int = 32, start: int = 0) -> Path:
    names = synthetic.species_names(species)
    for i, name in enumerate(names):
        synthetic.write_species(str(root), i, name, per, size, 0, [], 0.0)
    return root


def _folder_cfg(tree: Path, art: Path, *extra: str):
    return compose("+mode=data", "data=folder", f"data.root={tree}", f"paths.root={art}",
                   "data.quality.min_images_per_class=5", *extra)


@pytest.mark.ray
def test_job_reports_unreadable_duplicates_and_gates(ray_cluster, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    (tree / "aardvark" / "broken.jpg").write_bytes(b"this is not an image")
    good = (tree / "albatross" / "albatross_00001.jpg").read_bytes()
    (tree / "albatross" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    shutil.copy(tree / "aardvark" / "aardvark_00002.jpg", tree / "aardvark" / "copy_of_2.jpg")
    shutil.copy(tree / "alligator" / "alligator_00003.jpg", tree / "alpaca" / "mislabelled.jpg")
    (tree / "aardvark" / "notes.txt").write_text("not an image either")
    (tree / "stray.jpg").write_bytes(good)

    with pytest.raises(JobFailed) as info:  # 2 of 125 unreadable > the default 1%
        run_data(_folder_cfg(tree, tmp_path / "art"))
    assert "max_unreadable_fraction" in str(info.value)
    failed = info.value.summary
    report = json.loads(Path(failed["report_json"]).read_text())
    assert report["unreadable"]["count"] == 2
    assert {f["file"] for f in report["unreadable"]["files"]} == {"aardvark/broken.jpg", "albatross/truncated.jpg"}
    assert report["duplicates"]["exact_within_species"] == [
        {"file": "aardvark/copy_of_2.jpg", "duplicate_of": "aardvark/aardvark_00002.jpg"}]
    assert {f["file"] for f in report["duplicates"]["label_conflicts"]} == {
        "alligator/alligator_00003.jpg", "alpaca/mislabelled.jpg"}
    assert report["skipped"]["other_extension"] == 1 and report["skipped"]["not_in_species_folder"] == 1
    assert not Path(tmp_path / "art/snapshots/folder/latest.json").exists()  # a failed snapshot is not latest

    ok = run_data(_folder_cfg(tree, tmp_path / "art", "data.quality.max_unreadable_fraction=0.05"))
    assert ok["gates_passed"] and ok["num_images"] == 4 * 30 - 1  # minus the two conflicting copies + dup
    lines = Path(ok["manifest"]).read_text().splitlines()
    assert len(lines) == ok["num_images"]
    assert set(json.loads(lines[0])) == {"file", "species", "split", "sha256"}
    for key in ("report_json", "report_md", "report_png", "label_map"):
        assert Path(ok[key]).stat().st_size > 0, key
    assert Path(ok["report_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
def test_job_is_deterministic_and_keeps_splits_when_data_grows(ray_cluster, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", species=3, per=40)
    art = tmp_path / "art"
    first = run_data(_folder_cfg(tree, art))
    assert run_data(_folder_cfg(tree, art))["snapshot_hash"] == first["snapshot_hash"]
    before = {json.loads(x)["file"]: json.loads(x)["split"] for x in Path(first["manifest"]).read_text().splitlines()}

    # New images for old species, a new species, and a changed split recipe.
    extra = tmp_path / "extra"
    for i, name in enumerate(synthetic.species_names(4)):
        synthetic.write_species(str(extra), i, name, 30, 32, 99, [], 0.0)
    for sub in extra.iterdir():
        (tree / sub.name).mkdir(exist_ok=True)
        for f in sub.iterdir():
            f.rename(tree / sub.name / f"new_{f.name}")
    grown = run_data(_folder_cfg(tree, art, "data.splits.train=0.6", "data.splits.val=0.2",
                                 "data.splits.test=0.2", "data.splits.salt=v2"))
    after = {json.loads(x)["file"]: json.loads(x)["split"] for x in Path(grown["manifest"]).read_text().splitlines()}
    assert grown["snapshot_hash"] != first["snapshot_hash"]
    assert all(after[f] == s for f, s in before.items())  # no test image leaks into training
    report = json.loads(Path(grown["report_json"]).read_text())
    assert report["species_changes"] == {"added": ["alpaca"], "removed": []}
    assert report["splits"]["sticky_from_previous_snapshot"] == len(before)


@pytest.mark.ray
def test_how_much_data_max_per_class_and_since(ray_cluster, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", species=2, per=30)
    capped = run_data(_folder_cfg(tree, tmp_path / "a", "data.max_per_class=12",
                                   "data.quality.min_images_per_split=0"))
    assert capped["num_images"] == 24
    old = time.time() - 40 * 86400
    for f in sorted((tree / "aardvark").iterdir())[:20]:
        os.utime(f, (old, old))
    cutoff = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 10 * 86400))
    recent = run_data(_folder_cfg(tree, tmp_path / "b", f"data.since={cutoff}",
                                   "data.quality.min_images_per_split=0"))
    report = json.loads(Path(recent["report_json"]).read_text())
    assert report["per_species"]["aardvark"]["total"] == 10
    assert report["skipped"]["older_than_since"] == 20


@pytest.mark.ray
def test_gate_min_images_per_class_fails_with_the_species(ray_cluster, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", species=3, per=20)
    for f in sorted((tree / "alligator").iterdir())[:15]:
        f.unlink()
    with pytest.raises(JobFailed) as info:
        run_data(_folder_cfg(tree, tmp_path / "art", "data.quality.min_images_per_class=10"))
    assert "min_images_per_class" in str(info.value) and "alligator=5" in str(info.value)


@pytest.mark.ray
def test_cross_split_near_duplicates_fail_the_gate(ray_cluster, tmp_path: Path) -> None:
    from PIL import Image

    tree = _tree(tmp_path / "tree", species=2, per=30)
    art = tmp_path / "art"
    manifest = Path(run_data(_folder_cfg(tree, art))["manifest"])
    entries = [json.loads(x) for x in manifest.read_text().splitlines()]
    test_img = next(e for e in entries if e["split"] == "test")
    # The same picture re-encoded as PNG: new bytes, so a new content hash and its own split.
    for n in range(12):
        Image.open(tree / test_img["file"]).save(tree / test_img["species"] / f"reencoded_{n}.png")
    with pytest.raises(JobFailed) as info:
        run_data(_folder_cfg(tree, art))
    assert "max_cross_split_duplicates" in str(info.value)
@pytest.mark.ray


def test_synthetic_source_is_generated_once_then_reused(ray_cluster, tmp_path: Path) -> None:
    cfg = compose("+mode=data", "+experiment=smoke", f"paths.root={tmp_path}")
    first = run_data(cfg)
    marker = Path(cfg.data.root) / "_SYNTHETIC.json"
    stamp = marker.stat().st_mtime_ns
    second = run_data(cfg)
    assert marker.stat().st_mtime_ns == stamp and second["snapshot_hash"] == first["snapshot_hash"]
    assert first["num_species"] == cfg.data.synthetic.num_classes
@pytest.mark.ray


def test_cli_data_smoke_end_to_end(tmp_path: Path) -> None:
    proc = run_cli("+mode=data", "+experiment=smoke", f"paths.root={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "data" and summary["status"] == "ok"
    assert Path(summary["manifest"]).is_file() and Path(summary["report_md"]).is_file()
    assert summary["num_images"] == 8 * 60
