"""Proposals in GitOps form: the serve file with new versions and weights, its evidence,
and optionally a commit on a new branch, ready for a pull request.

The versions block of the serve file is rewritten in place, so comments and every other
key survive and the pull request's diff is only the traffic change.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from typing import Any

import yaml
from omegaconf import DictConfig

from mlplatform import storage
from mlplatform.errors import JobFailed

_TOP_KEY = re.compile(r"^[A-Za-z_][\w-]*\s*:")


def render_versions(versions: list[dict[str, Any]]) -> str:
    lines = ["versions:"]
    for v in versions:
        lines.append(f"  - ref: {v['ref']}")
        lines.append(f"    role: {v['role']}")
        lines.append(f"    weight: {int(v['weight'])}")
    return "\n".join(lines) + "\n"


def replace_versions(text: str, versions: list[dict[str, Any]]) -> str:
    """Swap the top-level `versions:` block of a serve YAML, keeping everything else."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if re.match(r"^versions\s*:", ln)), None)
    block = render_versions(versions)
    if start is None:
        return text.rstrip("\n") + "\n" + block
    end = start + 1
    while end < len(lines) and not _TOP_KEY.match(lines[end]):
        end += 1
    # Keep trailing comment lines that introduce the next key with the next key.
    while end - 1 > start and lines[end - 1].lstrip().startswith("#") and not lines[end - 1].startswith(" "):
        end -= 1
    out = "".join(lines[:start]) + block + "".join(lines[end:])
    parsed = yaml.safe_load(out)
    if [dict(ref=str(v["ref"]), role=v["role"], weight=int(v["weight"])) for v in parsed["versions"]] != \
            [dict(ref=str(v["ref"]), role=v["role"], weight=int(v["weight"])) for v in versions]:
        raise ValueError("rewriting the versions block failed")  # never propose a file we cannot read back
    return out


def _base_dir(cfg: DictConfig) -> str:
    return os.path.abspath(cfg.gitops.repo) if cfg.gitops.repo else os.getcwd()


def read_serve_file(cfg: DictConfig) -> str:
    path = os.path.join(_base_dir(cfg), cfg.gitops.serve_file)
    if not os.path.isfile(path):
        raise JobFailed(f"gitops.serve_file {path} does not exist", {"serve_file": path})
    with open(path, encoding="utf-8") as f:
        return f.read()


def _git(repo: str, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise JobFailed(f"git {' '.join(args[:2])} failed: {proc.stderr.strip()[:300]}", {"repo": repo})
    return proc.stdout.strip()


def propose(cfg: DictConfig, versions: list[dict[str, Any]], title: str, evidence: str, tag: str) -> dict[str, Any]:
    """Write the proposal under paths.root/proposals/<tag>/ and, with gitops.repo, commit it
    on a new branch through a temporary worktree (the checkout itself is not touched)."""
    new_text = replace_versions(read_serve_file(cfg), versions)
    out_dir = storage.join(storage.resolve_root(cfg.paths.root), "proposals", tag)
    serve_path = storage.join(out_dir, *cfg.gitops.serve_file.split("/"))
    storage.write_text(serve_path, new_text)
    storage.write_text(storage.join(out_dir, "EVIDENCE.md"), f"# {title}\n\n{evidence}\n")
    result: dict[str, Any] = {"serve_file": serve_path, "evidence": storage.join(out_dir, "EVIDENCE.md"),
                              "versions": versions, "branch": None, "commit": None}
    if cfg.gitops.repo:
        repo = os.path.abspath(cfg.gitops.repo)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        branch = f"{cfg.gitops.branch_prefix}{tag}-{stamp}"
        tmp = tempfile.mkdtemp(prefix="mlp-proposal-")
        worktree = os.path.join(tmp, "wt")
        try:
            _git(repo, "worktree", "add", "-q", "-b", branch, worktree, "HEAD")
            target = os.path.join(worktree, cfg.gitops.serve_file)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                f.write(new_text)
            _git(worktree, "add", cfg.gitops.serve_file)
            _git(worktree, "-c", "user.name=mlplatform", "-c", "user.email=mlplatform@localhost",
                 "commit", "-q", "-m", f"{title}\n\n{evidence}")
            result["commit"] = _git(worktree, "rev-parse", "HEAD")
            result["branch"] = branch
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=repo, capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def load_versions(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return list(yaml.safe_load(f)["versions"])
