"""The model registry: immutable numbered versions, atomic allocation and aliases, checksums.

torch is imported inside the tests, not at module level: worker processes re-import this module.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import stat

import pytest

from mlplatform.registry.mode import git_commit
from mlplatform.registry.store import ChecksumError, Registry, RegistryError

N_PROCS = 6
REGS_PER_PROC = 3


def _state_dict(seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(5, 8, generator=g).t(),  # non-contiguous on purpose
        "fc.bias": torch.arange(5, dtype=torch.float16),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


# ----------------------------------------------------------------------------- spawn workers


def _register_worker(root: str, out, i: int, barrier) -> None:
    import torch

    reg = Registry(root, "m")
    barrier.wait(timeout=60)
    for k in range(REGS_PER_PROC):
        n = i * REGS_PER_PROC + k
        v = reg.register({"w": torch.full((3,), float(n))}, {"n": n},
                         files={"note.txt": f"registration {n}".encode()})
        out.put((n, v))


def _alias_worker(root: str, i: int, barrier) -> None:
    reg = Registry(root, "m")
    barrier.wait(timeout=60)
    for _ in range(5):
        reg.set_alias(f"a{i}", "v1")
        reg.set_alias(f"shared-{i % 2}", "v2")


# Separate processes, forked from one server that imported torch and the registry once (a
# spawned worker would import torch itself: ~1.5 CPU-s each).
FORKS = mp.get_context("forkserver")
FORKS.set_forkserver_preload(["torch", "mlplatform.registry"])


def _spawn_all(target, *args) -> None:
    """Start N_PROCS worker processes `target(*args, i, barrier)`; they all wait at the barrier."""
    barrier = FORKS.Barrier(N_PROCS)
    procs = [FORKS.Process(target=target, args=(*args, i, barrier)) for i in range(N_PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * N_PROCS


# ----------------------------------------------------------------------------- register / read


def test_versions_increment_and_state_dict_round_trips(tmp_path) -> None:
    import torch

    reg = Registry(str(tmp_path), "species")
    assert reg.versions() == []
    sd = _state_dict(1)
    v1 = reg.register(sd, {"data_snapshot": "abc", "note": "first"},
                      files={"model_card.md": b"# card\n", "label_map.json": b'{"0": "cat"}'})
    v2 = reg.register(_state_dict(2), {"note": "second"})
    assert (v1, v2) == ("v1", "v2")
    assert reg.versions() == ["v1", "v2"]

    rec = reg.get("v1")
    assert rec["version"] == "v1" and rec["model_name"] == "species" and rec["note"] == "first"
    assert rec["weights"] == "model.safetensors" and len(rec["weights_sha256"]) == 64
    assert set(rec["files"]) == {"model_card.md", "label_map.json"}
    assert rec["created"].endswith("+00:00")

    loaded = reg.load_state_dict("v1")
    assert set(loaded) == set(sd)
    for k, t in sd.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k
    assert not torch.equal(reg.load_state_dict("v2")["conv.weight"], sd["conv.weight"])
    assert reg.read_file("v1", "model_card.md") == b"# card\n"
    assert reg.path("v1", "model_card.md") == str(tmp_path / "species" / "v1" / "model_card.md")
    with pytest.raises(RegistryError, match="no file 'missing.txt'"):
        reg.read_file("v1", "missing.txt")


def test_versions_sort_numerically(tmp_path) -> None:
    import torch

    reg = Registry(str(tmp_path), "m")
    base = tmp_path / "m"
    base.mkdir()
    for n in range(1, 10):  # fake-allocate v1..v9 as crashed (incomplete) directories
        (base / f"v{n}").mkdir()
    assert reg.versions() == []
    assert reg.register({"w": torch.zeros(1)}, {}) == "v10"
    for n in (2, 9):
        (base / f"v{n}" / "version.json").write_text(json.dumps({"version": f"v{n}"}))
    assert reg.versions() == ["v2", "v9", "v10"]


def test_files_are_read_only_and_versions_never_overwritten(tmp_path) -> None:
    import torch

    reg = Registry(str(tmp_path), "m")
    v = reg.register({"w": torch.ones(2)}, {"k": 1}, files={"reference.npz": b"\x00\x01"})
    vdir = tmp_path / "m" / v
    for name in ("model.safetensors", "version.json", "reference.npz"):
        mode = stat.S_IMODE(os.stat(vdir / name).st_mode)
        assert mode == 0o444, (name, oct(mode))
    before = {p.name: p.read_bytes() for p in vdir.iterdir()}
    v_next = reg.register({"w": torch.zeros(2)}, {"k": 2}, files={"reference.npz": b"other"})
    assert v_next != v
    assert {p.name: p.read_bytes() for p in vdir.iterdir()} == before
    assert torch.equal(reg.load_state_dict(v)["w"], torch.ones(2))


def test_register_rejects_bad_input_before_claiming_a_version(tmp_path) -> None:
    import torch

    reg = Registry(str(tmp_path), "m")
    with pytest.raises(RegistryError, match="bad file name"):
        reg.register({"w": torch.ones(1)}, {}, files={"../escape": b"x"})
    with pytest.raises(RegistryError, match="bad file name"):
        reg.register({"w": torch.ones(1)}, {}, files={"version.json": b"{}"})
    with pytest.raises(RegistryError, match="torch.Tensor"):
        reg.register({"w": [1, 2]}, {})
    with pytest.raises(RegistryError, match="bad model name"):
        Registry(str(tmp_path), "../x")
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").glob("v*"))


def test_tied_weights_are_saved(tmp_path) -> None:
    import torch

    w = torch.randn(3, 3)
    reg = Registry(str(tmp_path), "m")
    v = reg.register({"enc.weight": w, "dec.weight": w, "half": w[1:]}, {})
    out = reg.load_state_dict(v)
    assert torch.equal(out["enc.weight"], w) and torch.equal(out["dec.weight"], w)
    assert torch.equal(out["half"], w[1:])


def test_incomplete_version_is_ignored_and_skipped(tmp_path) -> None:
    import torch

    reg = Registry(str(tmp_path), "m")
    assert reg.register({"w": torch.ones(1)}, {}) == "v1"
    crashed = tmp_path / "m" / "v2"  # a register that died before writing version.json
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    assert reg.versions() == ["v1"]
    with pytest.raises(RegistryError, match="incomplete"):
        reg.get("v2")
    assert reg.register({"w": torch.zeros(1)}, {}) == "v3"
    assert reg.versions() == ["v1", "v3"]
    assert (crashed / "model.safetensors").read_bytes() == b"partial"  # untouched


def test_concurrent_registration_gets_distinct_versions(tmp_path) -> None:
    import torch

    root = str(tmp_path)
    out = FORKS.Queue()
    _spawn_all(_register_worker, root, out)
    total = N_PROCS * REGS_PER_PROC
    results = dict(out.get(timeout=10) for _ in range(total))
    reg = Registry(root, "m")
    expected = [f"v{n}" for n in range(1, total + 1)]
    assert sorted(results.values(), key=lambda v: int(v[1:])) == expected
    assert reg.versions() == expected
    for n, v in results.items():
        assert reg.get(v)["n"] == n
        assert torch.equal(reg.load_state_dict(v)["w"], torch.full((3,), float(n)))
        assert reg.read_file(v, "note.txt") == f"registration {n}".encode()


def test_claim_retries_when_another_process_got_there_first(tmp_path, monkeypatch) -> None:
    """Deterministic twin of the race above: the listing is stale, mkdir must still win."""
    import torch

    import mlplatform.registry.store as registry_mod

    reg = Registry(str(tmp_path), "m")
    reg.register({"w": torch.ones(2)}, {"first": True}, files={"note.txt": b"one"})
    reg.register({"w": torch.ones(2)}, {"second": True})
    vdir = tmp_path / "m" / "v1"
    before = {p.name: p.read_bytes() for p in vdir.iterdir()}
    monkeypatch.setattr(registry_mod, "_list_dir", lambda path: [])  # saw nothing: tries v1
    assert reg.register({"w": torch.zeros(2)}, {"third": True}, files={"note.txt": b"3"}) == "v3"
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in vdir.iterdir()} == before
    assert reg.get("v1")["first"] and reg.get("v3")["third"]


# ----------------------------------------------------------------------------- aliases


def test_aliases_set_get_resolve_remove(tmp_path) -> None:
    import torch

    reg = Registry(str(tmp_path), "m")
    for i in range(3):
        reg.register({"w": torch.full((1,), float(i))}, {"i": i})
    assert reg.aliases() == {}
    assert reg.set_alias("production", "v2") == {"production": "v2"}
    assert reg.set_alias("candidate", "v3") == {"production": "v2", "candidate": "v3"}
    assert reg.resolve("production") == "v2" and reg.resolve("v1") == "v1"
    assert reg.get("candidate")["i"] == 2
    assert float(reg.load_state_dict("production")["w"]) == 1.0
    assert reg.set_alias("production", "candidate")["production"] == "v3"  # promote
    assert reg.remove_alias("candidate") == {"production": "v3"}
    assert reg.aliases() == {"production": "v3"}

    with pytest.raises(RegistryError, match="v9") as e:
        reg.set_alias("production", "v9")
    assert "v1, v2, v3" in str(e.value) and "production->v3" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(RegistryError, match="unknown version or alias 'staging'"):
        reg.get("staging")
    for bad in ("v4", "Prod", "1x", "", "a b", "prod/x"):
        with pytest.raises(RegistryError, match="bad alias"):
            reg.set_alias(bad, "v1")
    with pytest.raises(RegistryError, match="no alias"):
        reg.remove_alias("candidate")
    assert reg.aliases() == {"production": "v3"}


def test_concurrent_alias_updates_lose_none(tmp_path) -> None:
    import torch

    root = str(tmp_path)
    reg = Registry(root, "m")
    reg.register({"w": torch.ones(1)}, {})
    reg.register({"w": torch.zeros(1)}, {})
    _spawn_all(_alias_worker, root)
    expected = {f"a{i}": "v1" for i in range(N_PROCS)} | {"shared-0": "v2", "shared-1": "v2"}
    assert reg.aliases() == expected
    mdir = tmp_path / "m"
    assert sorted(p.name for p in mdir.iterdir()) == [".aliases.lock", "aliases.json", "v1", "v2"]


def test_aliases_json_is_never_half_written(tmp_path) -> None:
    """A reader polling aliases.json during many updates always sees whole, valid JSON."""
    import threading

    import torch

    reg = Registry(str(tmp_path), "m")
    reg.register({"w": torch.ones(1)}, {})
    p = tmp_path / "m" / "aliases.json"
    stop = threading.Event()
    bad: list[str] = []

    def poll() -> None:
        while not stop.is_set():
            if p.exists():
                text = p.read_text()
                try:
                    json.loads(text)
                except ValueError:
                    bad.append(text)

    t = threading.Thread(target=poll)
    t.start()
    try:
        for i in range(150):
            reg.set_alias(f"alias-{i:03d}-" + "x" * 40, "v1")
    finally:
        stop.set()
        t.join()
    assert bad == []
    assert len(reg.aliases()) == 150
    leftovers = [q.name for q in (tmp_path / "m").iterdir() if ".tmp" in q.name]
    assert leftovers == []


# ----------------------------------------------------------------------------- checksums


def test_checksum_mismatch_refuses_to_load(tmp_path) -> None:
    import torch

    reg = Registry(str(tmp_path), "m")
    v = reg.register({"w": torch.arange(64, dtype=torch.float32)}, {},
                     files={"label_map.json": b'{"0": "a"}'})
    sha = reg.get(v)["weights_sha256"]
    weights = tmp_path / "m" / v / "model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # inside the tensor data: safetensors itself would happily load this
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as e:
        reg.load_state_dict(v)
    msg = str(e.value)
    assert v in msg and sha in msg and reg.path(v, "model.safetensors") not in msg
    with pytest.raises(ChecksumError):
        reg.read_file(v, "model.safetensors")
    with pytest.raises(ChecksumError, match=sha):
        reg.verify_weights(v)

    card = tmp_path / "m" / v / "label_map.json"
    os.chmod(card, 0o644)
    card.write_bytes(b'{"0": "b"}')
    with pytest.raises(ChecksumError, match="label_map.json"):
        reg.read_file(v, "label_map.json")
    assert issubclass(ChecksumError, RegistryError)


# ----------------------------------------------------------------------------- verdicts, lineage


def test_verdicts_record_and_latest(tmp_path) -> None:
    import torch

    reg = Registry(str(tmp_path), "m")
    v1 = reg.register({"w": torch.ones(1)}, {"gate": {"passed": True, "by": "train"}})
    v2 = reg.register({"w": torch.ones(1)}, {})
    assert reg.verdicts(v2) == [] and reg.latest_verdict(v2) is None
    assert reg.latest_verdict(v1) == {"passed": True, "by": "train"}

    before = sorted(os.listdir(tmp_path / "m" / v1))
    paths = []
    for i in range(3):
        paths.append(reg.record_verdict(v1, {"passed": i != 2, "round": i}))
    assert len(set(paths)) == 3 and all(p.startswith(reg.path(v1, "verdicts")) for p in paths)
    assert sorted(os.listdir(tmp_path / "m" / v1)) == sorted([*before, "verdicts"])
    vs = reg.verdicts(v1)
    assert [x.get("round") for x in vs] == [None, 0, 1, 2]
    latest = reg.latest_verdict(v1)
    assert latest["round"] == 2 and latest["passed"] is False and latest["version"] == v1
    reg.set_alias("production", v1)
    assert reg.latest_verdict("production") == latest
    assert reg.get(v1)["gate"] == {"passed": True, "by": "train"}  # version.json unchanged


def test_lineage_tolerates_missing_keys(tmp_path) -> None:
    import torch

    reg = Registry(str(tmp_path), "m")
    v1 = reg.register({"w": torch.ones(1)}, {})
    v2 = reg.register({"w": torch.ones(1)}, {
        "data_snapshot": "sha256:abc", "git_commit": "deadbeef", "parent": v1,
        "config": {"model": {"_target_": "mlplatform.models.cnn.SmallCNN"}}})
    lin = reg.lineage(v2)
    assert lin["version"] == v2 and lin["data_snapshot"] == "sha256:abc"
    assert lin["git_commit"] == "deadbeef" and lin["parent"] == v1
    assert lin["config_target"] == "mlplatform.models.cnn.SmallCNN" and lin["created"]
    bare = reg.lineage(v1)
    assert bare["version"] == v1 and bare["parent"] is None and bare["config_target"] is None


def test_git_commit_is_head_dirty_when_tracked_files_changed_and_none_outside_git(tmp_path, monkeypatch) -> None:
    """GIT_DIR and GIT_WORK_TREE point git at a repository made here, wherever this checkout is."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                              capture_output=True, text=True, check=True).stdout.strip()

    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q")
    (repo / "train.py").write_text("epochs = 1\n")
    git("add", "train.py")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    assert len(head) == 40 and all(ch in "0123456789abcdef" for ch in head)
    monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(repo))
    assert git_commit() == head
    (repo / "notes.txt").write_text("untracked files do not make the tree dirty")
    assert git_commit() == head
    (repo / "train.py").write_text("epochs = 2\n")
    assert git_commit() == f"{head}-dirty"
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "nowhere"))  # not a repository
    assert git_commit() is None


def test_uri_root_refuses_concurrent_writes(tmp_path) -> None:
    import torch

    reg = Registry("file://" + str(tmp_path), "m")
    with pytest.raises(RegistryError, match="local filesystem"):
        reg.register({"w": torch.ones(1)}, {})
    local = Registry(str(tmp_path), "m")
    local.register({"w": torch.ones(1)}, {})
    assert reg.versions() == ["v1"]  # reading through a URI works
    assert torch.equal(reg.load_state_dict("v1")["w"], torch.ones(1))
