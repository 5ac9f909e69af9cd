"""The watched repository: a bare mirror under the reconciler's cache, fetched each poll,
and each commit's config directory extracted (`git archive`) into a folder of its own."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile


class GitError(RuntimeError):
    """A git command failed; the message is its first line of stderr."""


def _git(*args: str, git_dir: str | None = None, timeout: float = 120) -> bytes:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # a remote asking for a password fails, never hangs
    where = ["--git-dir", git_dir] if git_dir else []
    try:
        proc = subprocess.run(["git", *where, *args], capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]}: no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        err = [line.removeprefix("fatal: ") for line in proc.stderr.decode(errors="replace").strip().splitlines()]
        raise GitError(f"git {args[0]}: {err[0] if err else f'exit {proc.returncode}'}")
    return proc.stdout


class Mirror:
    def __init__(self, repo: str, branch: str, cache_dir: str) -> None:
        # A local path is made absolute: git runs inside the mirror.
        self.repo = os.path.abspath(repo) if os.path.exists(repo) else repo
        self.branch = branch
        self.cache_dir = cache_dir
        self.git_dir = os.path.join(cache_dir, "mirror.git")
        self.commits_dir = os.path.join(cache_dir, "commits")

    def fetch(self) -> str:
        """Fetch the branch; returns its head commit."""
        if not os.path.isdir(self.git_dir):
            os.makedirs(self.cache_dir, exist_ok=True)
            _git("init", "--quiet", "--bare", self.git_dir)
        ref = f"refs/watched/{self.branch}"
        _git("fetch", "--quiet", "--no-tags", "--force", self.repo,
             f"+refs/heads/{self.branch}:{ref}", git_dir=self.git_dir)
        return _git("rev-parse", ref, git_dir=self.git_dir).decode().strip()

    def checkout(self, commit: str, subdir: str) -> str:
        """`subdir` of `commit`, extracted once; returns the folder holding it (the commit's root)."""
        dest = os.path.join(self.commits_dir, commit)
        if os.path.isdir(dest):
            return dest
        data = _git("archive", "--format=tar", commit, "--", subdir.strip("/") or ".", git_dir=self.git_dir)
        tmp = f"{dest}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp, dest)
        return dest

    def prune(self, keep: set[str]) -> None:
        """Remove extracted commits other than `keep`."""
        if not os.path.isdir(self.commits_dir):
            return
        for name in os.listdir(self.commits_dir):
            if name not in keep:
                shutil.rmtree(os.path.join(self.commits_dir, name), ignore_errors=True)
