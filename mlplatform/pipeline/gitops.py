"""Proposals in GitOps form: the serve file with the next traffic state, its evidence, and
optionally a commit on a new branch, ready for a pull request.

`next_traffic` is the one place that decides what a step of a rollout does to
`serve.versions` and `serve.shadows`. The proposal's serve file (`propose`) and the config
that `rollout.apply=true` deploys (`applied`) both come from it, so the pull request a
person reviews is what `apply` deploys.

The serve file is edited with ruamel.yaml's round-trip mode: comments, key order, flow or
block style and every key of each entry (its `deployment` overrides, keys a later schema
adds) stay; only the values the step changes change.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import yaml
from omegaconf import DictConfig, OmegaConf
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.emitter import RoundTripEmitter
from ruamel.yaml.error import CommentMark
from ruamel.yaml.events import MappingEndEvent
from ruamel.yaml.tokens import CommentToken

from mlplatform import storage
from mlplatform.errors import ConfigError, JobFailed

log = logging.getLogger(__name__)

KINDS = ("canary", "advance", "promote", "rollback")
# The keys of an entry a step may change; every other key of a kept entry is left alone.
TRAFFIC_KEYS = {"versions": ("ref", "role", "weight"), "shadows": ("ref", "mirror")}


@dataclass(frozen=True)
class Change:
    """One step of a rollout.

    kind: `canary` (a new candidate at `weight` beside stable), `advance` (the canary to
    `weight`), `promote` (the canary becomes the only, stable version) or `rollback` (stable
    takes all traffic). `version` is the canary's version id: the entry's ref is pinned to it,
    so an alias that moves later cannot change what the proposal serves. `stable`, for
    `canary`, pins the stable entry's ref the same way.
    """

    kind: str
    version: str
    weight: int = 0
    stable: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of change {self.kind!r}; one of {', '.join(KINDS)}")


@dataclass
class Traffic:
    """serve.versions and serve.shadows after a change; each entry with the index of the entry
    it continues (None: a new one), so an editor can keep that entry's own keys and comments."""

    versions: list[tuple[int | None, dict[str, Any]]]
    shadows: list[tuple[int | None, dict[str, Any]]]

    def plain(self) -> dict[str, list[dict[str, Any]]]:
        return {"versions": [e for _, e in self.versions], "shadows": [e for _, e in self.shadows]}


def mirrors(shadow_ref: Any, ref: Any, version: str) -> bool:
    """Whether a shadow mirrors the version served under `ref` (resolved to `version`)."""
    return str(shadow_ref) in (str(ref), version)


def next_traffic(versions: list[dict[str, Any]], shadows: list[dict[str, Any]], change: Change) -> Traffic:
    """The traffic state after `change`: the single definition both the proposal and apply use."""
    stable_i = next((i for i, v in enumerate(versions) if v["role"] == "stable"), None)
    canary_i = next((i for i, v in enumerate(versions) if v["role"] == "canary"), None)
    if stable_i is None:
        raise ValueError("serve.versions has no stable version")
    if canary_i is None and change.kind != "canary":
        raise ValueError(f"a {change.kind} needs a canary in serve.versions")

    def keep(i: int, **fields: Any) -> tuple[int, dict[str, Any]]:
        return i, {**copy.deepcopy(versions[i]), **fields}

    stable = versions[stable_i]
    if change.kind == "canary":  # a new candidate replaces any canary under way
        new = [keep(stable_i, ref=change.stable or stable["ref"], weight=100 - change.weight),
               (None, {"ref": change.version, "role": "canary", "weight": change.weight})]
    elif change.kind == "advance":
        new = [keep(stable_i, weight=100 - change.weight),
               keep(canary_i, ref=change.version, weight=change.weight)]
    elif change.kind == "promote":  # the old stable is retired
        new = [keep(canary_i, ref=change.version, role="stable", weight=100)]
    else:
        new = [keep(stable_i, weight=100)]
    new.sort(key=lambda e: len(versions) if e[0] is None else e[0])  # the file's order stays

    # A canary that leaves (rolled back, promoted, replaced) takes its mirror with it, as in
    # Argo Rollouts and Flagger: an abort sends all traffic, live and mirrored, back to
    # stable and scales the canary down. A version that failed its analysis should keep no
    # replicas busy and feed no agreement metric, and the next candidate starts clean; a
    # promoted one cannot be stable and a shadow at once. An advance leaves shadows alone.
    gone: set[str] = set()
    if canary_i is not None and change.kind != "advance":
        gone.add(str(versions[canary_i]["ref"]))
        if change.kind != "canary":
            gone.add(change.version)
    if change.kind == "canary":
        gone.add(change.version)  # it is served now, no longer mirrored
    kept_shadows = [(i, copy.deepcopy(sh)) for i, sh in enumerate(shadows) if str(sh["ref"]) not in gone]
    return Traffic(new, kept_shadows)


def serve_traffic(cfg: DictConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return (OmegaConf.to_container(cfg.serve.versions, resolve=True),
            OmegaConf.to_container(cfg.serve.shadows, resolve=True))


def applied(cfg: DictConfig, change: Change) -> DictConfig:
    """The config `rollout.apply=true` deploys: what the proposal's serve file composes to."""
    return OmegaConf.merge(cfg, {"serve": next_traffic(*serve_traffic(cfg), change).plain()})


# ----------------------------------------------------------------------------- the YAML edit

# (mapping, sequence, offset) indentations tried in turn; the first that reproduces the
# file unchanged is the file's own.
_INDENTS = ((2, 4, 2), (2, 2, 0), (4, 6, 2), (4, 4, 0), (4, 4, 2))


class _Emitter(RoundTripEmitter):
    """ruamel.yaml (0.18, 0.19) forgets to clear its "just wrote `- `" flag after the
    end-of-line comment of a flow mapping, so in `- {ref: v2}  # c` followed by a block
    mapping entry, that entry's second key lands on its first key's line: invalid YAML."""

    def expect_flow_mapping_key(self) -> None:
        eol = isinstance(self.event, MappingEndEvent) and bool(self.event.comment and self.event.comment[0])
        super().expect_flow_mapping_key()
        if eol:
            self.no_newline = False


def _yaml(indent: tuple[int, int, int]) -> YAML:
    y = YAML()
    y.Emitter = _Emitter
    y.preserve_quotes = True
    y.width = 4096  # never fold a long value onto a second line
    y.indent(mapping=indent[0], sequence=indent[1], offset=indent[2])
    y.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _dump(y: YAML, doc: Any) -> str:
    out = io.StringIO()
    y.dump(doc, out)
    return out.getvalue()


def _load(text: str) -> tuple[YAML, Any]:
    for indent in _INDENTS:
        y = _yaml(indent)
        doc = y.load(text)
        if _dump(y, doc) == text:
            return y, doc
    log.warning("the serve file does not round-trip unchanged in any usual indentation; "
                "the proposal's diff will show layout changes too")
    y = _yaml(_INDENTS[0])
    return y, y.load(text)


def _is_block(node: Any) -> bool:
    return isinstance(node, (CommentedMap, CommentedSeq)) and len(node) > 0 and not node.fa.flow_style()


def _tail_slot(parent: CommentedMap | CommentedSeq, key: Any) -> tuple[list[Any], int]:
    """Where ruamel keeps the comments that follow parent[key]: the end-of-line comment of its
    last scalar, then the full-line comments up to the next sibling, as one token."""
    value = parent[key]
    if _is_block(value):
        return _tail_slot(value, len(value) - 1 if isinstance(value, CommentedSeq) else list(value)[-1])
    slot = parent.ca.items.setdefault(key, [None, None, None, None])
    return slot, 0 if isinstance(parent, CommentedSeq) else 2


def _detach_tail(parent: CommentedMap | CommentedSeq, key: Any) -> str:
    """Remove and return the full-line comments after parent[key], keeping its end-of-line one."""
    slot, i = _tail_slot(parent, key)
    token = slot[i]
    if not isinstance(token, CommentToken):
        return ""
    eol, _, rest = token.value.partition("\n")
    if eol.strip():
        token.value = eol + "\n"
    else:
        slot[i] = None
    return rest


def _attach_tail(parent: CommentedMap | CommentedSeq, key: Any, text: str) -> None:
    if not text:
        return
    slot, i = _tail_slot(parent, key)
    if isinstance(slot[i], CommentToken):
        slot[i].value += text
    else:
        slot[i] = CommentToken("\n" + text, CommentMark(0), None)


def _new_entry(siblings: CommentedSeq, entry: dict[str, Any], keys: tuple[str, ...]) -> CommentedMap:
    """An entry the file lacks, in its siblings' style: the traffic keys, then any other key
    that is set (an unset override is what the schema gives anyway)."""

    def set_only(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: set_only(v) for k, v in value.items() if v is not None and v != {}}
        return value

    node = CommentedMap((k, entry[k]) for k in keys if k in entry)
    node.update({k: v for k, v in set_only(entry).items() if k not in keys and v not in (None, {}, [])})
    if any(isinstance(s, CommentedMap) and s.fa.flow_style() for s in siblings):
        node.fa.set_flow_style()
    return node


def _edit_list(doc: CommentedMap, key: str, old: list[dict[str, Any]],
               new: list[tuple[int | None, dict[str, Any]]]) -> None:
    """Make doc[key] list `new`: entries of `old` that stay keep their node (comments, style,
    every other key) with only the traffic keys updated; the others go with their comments."""
    seq = doc.get(key)
    if not isinstance(seq, CommentedSeq):
        if not new and key not in doc:  # the schema's default stands
            return
        seq = doc[key] = CommentedSeq()
    block = not seq.fa.flow_style()
    # The comment lines before an entry (but the first: those describe the list) belong to
    # that entry; those after the last entry belong to what follows the list.
    leads = [""] + [_detach_tail(seq, i - 1) for i in range(1, len(seq))] if block else [""] * len(seq)
    tail = _detach_tail(seq, len(seq) - 1) if block and len(seq) else ""

    keys = TRAFFIC_KEYS[key]
    unused = list(range(len(seq)))
    entries: list[tuple[CommentedMap, Any, str]] = []  # (node, its comment slot in seq, its lead)
    for origin, entry in new:
        ref = str(old[origin]["ref"]) if origin is not None else None
        at = next((j for j in unused if ref is not None and str(seq[j].get("ref")) == ref), None)
        if at is None:
            entries.append((_new_entry(seq, entry, keys), None, ""))
            continue
        unused.remove(at)
        node = seq[at]
        for k in keys:
            if k in entry and node.get(k) != entry[k]:
                node[k] = entry[k]
        entries.append((node, seq.ca.items.get(at), leads[at]))
    del seq[:]
    seq.ca.items.clear()
    for p, (node, slot, _) in enumerate(entries):
        seq.append(node)
        if slot is not None:
            seq.ca.items[p] = slot
    if not entries:
        seq.fa.set_flow_style()  # `key: []`
        if tail:  # nothing left to hang them on: they lead the next key
            _attach_tail(doc, key, tail)
        return
    if entries[0][2]:
        slot = doc.ca.items.setdefault(key, [None, None, None, None])
        slot[3] = [*(slot[3] or []), CommentToken(entries[0][2], CommentMark(0), None)]
    for p in range(1, len(entries)):
        _attach_tail(seq, p - 1, entries[p][2])
    _attach_tail(seq, len(seq) - 1, tail)


def edit_serve_text(text: str, versions: list[dict[str, Any]], shadows: list[dict[str, Any]],
                    traffic: Traffic) -> str:
    """The serve file `text` with `traffic` in place of `versions` and `shadows`."""
    y, doc = _load(text)
    _edit_list(doc, "versions", versions, traffic.versions)
    _edit_list(doc, "shadows", shadows, traffic.shadows)
    out = _dump(y, doc)
    # Never propose a file that does not read back as intended.
    before = yaml.safe_load(text)
    try:
        after = yaml.safe_load(out)
    except yaml.YAMLError as exc:
        raise ValueError(f"the edited serve file is not valid YAML: {exc}") from None
    want = traffic.plain()
    for key, keys in TRAFFIC_KEYS.items():
        got = [{k: e.get(k) for k in keys} for e in after.get(key) or []]
        if got != [{k: e.get(k) for k in keys} for e in want[key]]:
            raise ValueError(f"editing the serve file's {key} failed: {got}")
    if {k: v for k, v in after.items() if k not in TRAFFIC_KEYS} != \
            {k: v for k, v in before.items() if k not in TRAFFIC_KEYS}:
        raise ValueError("editing the serve file changed keys other than versions and shadows")
    return out


# ----------------------------------------------------------------------------- proposals

# A commit's author when the platform commits (no user identity is assumed to be configured).
_IDENTITY = ("-c", "user.name=mlplatform", "-c", "user.email=mlplatform@localhost")
# A push refused because the branch moved on since the clone (or during the push).
_MOVED = ("non-fast-forward", "fetch first", "stale info", "cannot lock ref", "failed to update ref")


def is_local(repo: str) -> bool:
    """gitops.repo names a directory here (a checkout or a bare repository); anything else is a
    URL for git to fetch."""
    return os.path.isdir(repo)


def read_serve_file(cfg: DictConfig) -> str:
    """The serve file a proposal edits: on gitops.branch of a local gitops.repo; otherwise the
    one this process composed its config from (relative to the working directory)."""
    g = cfg.gitops
    if g.repo and is_local(g.repo):
        return _git(os.path.abspath(g.repo), "show", f"refs/heads/{g.branch}:{g.serve_file}")
    path = os.path.abspath(g.serve_file)
    if not os.path.isfile(path):
        raise JobFailed(f"gitops.serve_file {path} does not exist", {"serve_file": path})
    with open(path, encoding="utf-8") as f:
        return f.read()


class GitError(JobFailed):
    def __init__(self, message: str, repo: str, stderr: str) -> None:
        super().__init__(message, {"repo": repo})
        self.stderr = stderr


def _git(repo: str, *args: str, timeout: float = 120) -> str:
    # No credential prompt: a job has no terminal, and a prompt would hang it until the timeout.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise GitError(f"git {' '.join(args[:2])} timed out after {timeout:.0f} s", repo, "") from None
    if proc.returncode != 0:
        raise GitError(f"git {' '.join(args[:2])} failed: {proc.stderr.strip()[:300]}", repo, proc.stderr)
    return proc.stdout.strip()


def _clone(cfg: DictConfig, into: str) -> str:
    """A fresh clone of gitops.branch of gitops.repo (a path or a URL) in `into`."""
    g = cfg.gitops
    source = os.path.abspath(g.repo) if is_local(g.repo) else str(g.repo)
    try:
        _git(os.path.dirname(into), "clone", "-q", "--no-tags", "--single-branch", "--branch", str(g.branch),
             source, into)
    except GitError as exc:
        raise JobFailed(f"gitops.repo={g.repo} gitops.branch={g.branch}: cannot clone: {exc}",
                        {"repo": str(g.repo), "branch": str(g.branch)}) from None
    return into


def _read(work: str, cfg: DictConfig) -> str:
    path = os.path.join(work, cfg.gitops.serve_file)
    if not os.path.isfile(path):
        raise JobFailed(f"gitops.serve_file {cfg.gitops.serve_file} does not exist on {cfg.gitops.branch} "
                        f"of {cfg.gitops.repo}", {"serve_file": cfg.gitops.serve_file})
    with open(path, encoding="utf-8") as f:
        return f.read()


def _commit_file(work: str, cfg: DictConfig, text: str, message: str) -> str:
    target = os.path.join(work, cfg.gitops.serve_file)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)
    _git(work, "add", cfg.gitops.serve_file)
    _git(work, *_IDENTITY, "commit", "-q", "-m", message)
    return _git(work, "rev-parse", "HEAD")


def _remote_target(remote: str) -> str:
    """gitops.remote as git push takes it: a path made absolute (the push runs elsewhere)."""
    return os.path.abspath(remote) if "://" not in remote and os.path.exists(remote) else remote


def _remote_url(work: str, remote: str) -> str:
    try:  # a remote name of the repository
        return _git(work, "remote", "get-url", remote)
    except GitError:
        return remote


def _forge(url: str) -> tuple[str, str] | None:
    """(host, owner/name) of a GitHub or GitLab remote URL, for a compare link."""
    m = re.match(r"^(?:https?://(?:[^@/]+@)?|ssh://(?:[^@/]+@)?|[^@/:]+@)([^/:]+)(?::\d+)?[:/](.+?)(?:\.git)?/?$", url)
    if m and ("github" in m.group(1) or "gitlab" in m.group(1)):
        return m.group(1), m.group(2)
    return None


def _how_to_open(base: str, branch: str, title: str, remote_url: str, body_file: str) -> str:
    q = shlex.quote
    forge = _forge(remote_url)
    if forge and "gitlab" in forge[0]:
        compare = (f"https://{forge[0]}/{forge[1]}/-/merge_requests/new?merge_request%5Bsource_branch%5D="
                   f"{quote(branch, safe='')}&merge_request%5Btarget_branch%5D={quote(base, safe='')}")
    elif forge:
        compare = f"https://{forge[0]}/{forge[1]}/compare/{quote(base)}...{quote(branch)}?expand=1"
    else:
        compare = f"git clone -q {q(remote_url)} proposal && git -C proposal diff origin/{q(base)}...origin/{q(branch)}"
    gh = (f"gh pr create{f' --repo {q(forge[1])}' if forge and 'github' in forge[0] else ''} --base {q(base)} "
          f"--head {q(branch)} --title {q(title)} --body-file {q(body_file)}")
    return f"open the pull request: {compare} ; or: {gh}"


def _run_pr_command(cfg: DictConfig, work: str, values: dict[str, str]) -> dict[str, Any]:
    """gitops.pr_command with its placeholders filled, each token on its own: no shell reads the
    title or the body, whatever they hold."""
    argv = [token.format(**values) for token in shlex.split(str(cfg.gitops.pr_command))]
    try:
        proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"pr_url": None, "pr_error": f"gitops.pr_command {argv[0]}: {exc}"}
    out = proc.stdout.strip()
    if proc.returncode != 0:
        first = next((ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()), "")
        return {"pr_url": None, "pr_output": out[-2000:] or None,
                "pr_error": f"gitops.pr_command {argv[0]} exited {proc.returncode}: {first}"}
    # gh and glab print the new request's URL, last
    urls = re.findall(r"https?://\S+", out)
    return {"pr_url": urls[-1] if urls else (out.splitlines()[-1] if out else None), "pr_output": out[-2000:] or None,
            "pr_error": None}


def proposal_body(evidence: str, traffic: Traffic, links: dict[str, str]) -> str:
    """The pull request's description: the evidence (its table and checks), the traffic the
    change sets, and where the model card and reports are."""
    lines = [evidence.rstrip(), "", "Traffic after this change:", "", "| | ref | role | weight |", "|---|---|---|---|"]
    lines += [f"| version | {v['ref']} | {v['role']} | {v['weight']} |" for _, v in traffic.versions]
    lines += [f"| shadow | {s['ref']} | mirror | {s['mirror']} |" for _, s in traffic.shadows]
    if links:
        lines += ["", "Links:", ""] + [f"- {name}: `{path}`" for name, path in links.items()]
    return "\n".join(lines) + "\n"


def _model_card(cfg: DictConfig, version: str) -> str | None:
    from mlplatform.registry.store import Registry, RegistryError

    try:
        path = Registry(storage.resolve_root(cfg.registry.root), cfg.registry.model_name).path(version, "model_card.md")
    except (RegistryError, OSError):
        return None
    return path if storage.exists(path) else None


def _traffic_keys(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {key: [{k: str(e.get(k)) for k in keys} for e in doc.get(key) or []] for key, keys in TRAFFIC_KEYS.items()}


def propose(cfg: DictConfig, change: Change, title: str, evidence: str, tag: str,
            links: dict[str, str] | None = None) -> dict[str, Any]:
    """The serve file after `change` (the traffic of cfg.serve, the one analysed), with a title
    and a body, under paths.root/proposals/<tag>/; with gitops.repo, a commit of it on a new
    branch from gitops.branch, pushed to gitops.remote, and the pull request opened with
    gitops.pr_command (or a note that says how to open it).

    A local gitops.repo gets the branch through a temporary worktree (its checkout is not
    touched); a URL is cloned into a temporary directory. `links` (name -> path) go into the
    body, after the model card of the change's version when the registry has one."""
    g = cfg.gitops
    versions, shadows = serve_traffic(cfg)
    traffic = next_traffic(versions, shadows, change)
    links = {**({"model card": card} if (card := _model_card(cfg, change.version)) else {}), **(links or {})}
    body = proposal_body(evidence, traffic, links)
    out_dir = storage.join(storage.resolve_root(cfg.paths.root), "proposals", tag)
    serve_path = storage.join(out_dir, *g.serve_file.split("/"))
    pr_path, body_path = storage.join(out_dir, "PULL_REQUEST.md"), storage.join(out_dir, "BODY.md")
    result: dict[str, Any] = {"serve_file": serve_path, "title": title, "body": pr_path, **traffic.plain(),
                              "base": str(g.branch) if g.repo else None, "branch": None, "commit": None,
                              "remote": g.remote if g.repo else None, "pushed": False, "pr_url": None,
                              "pr_error": None, "note": None}

    def write(base_text: str) -> str:
        new_text = edit_serve_text(base_text, versions, shadows, traffic)
        storage.write_text(serve_path, new_text)
        storage.write_text(pr_path, f"# {title}\n\n{body}")
        storage.write_text(body_path, body)
        return new_text

    if not g.repo:
        write(read_serve_file(cfg))
        result["note"] = "gitops.repo is not set: the proposal is a serve file only; commit it to open a pull request"
        return result
    local = is_local(g.repo)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    branch = f"{g.branch_prefix}{tag}-{stamp}"
    tmp = tempfile.mkdtemp(prefix="mlp-proposal-")
    work = os.path.join(tmp, "work")
    repo = os.path.abspath(g.repo) if local else None
    try:
        if local:
            try:
                _git(repo, "rev-parse", "-q", "--verify", f"refs/heads/{g.branch}^{{commit}}")
            except GitError:
                raise JobFailed(f"gitops.branch={g.branch}: no such branch in gitops.repo {repo}",
                                {"repo": repo, "branch": str(g.branch)}) from None
            _git(repo, "worktree", "add", "-q", "-b", branch, work, f"refs/heads/{g.branch}")
        else:
            _clone(cfg, work)
            _git(work, "checkout", "-q", "-b", branch)
        base_text = _read(work, cfg)
        if _traffic_keys(yaml.safe_load(base_text) or {}) != _traffic_keys({"versions": versions, "shadows": shadows}):
            log.warning("%s on %s serves other traffic than the config this proposal was computed from; "
                        "the proposal replaces it", g.serve_file, g.branch)
        new_text = write(base_text)
        if new_text == base_text:
            result["note"] = f"{g.serve_file} on {g.branch} has this traffic already: nothing to propose"
            return result
        if not g.remote and not local:
            result["note"] = (f"not pushed (gitops.remote is null), so the proposal branch of gitops.repo={g.repo} "
                              f"was not kept: set gitops.remote (origin: the repository itself) to push it")
            return result
        result["commit"] = _commit_file(work, cfg, new_text, f"{title}\n\n{body}")
        result["branch"] = branch
        body_file = body_path if not storage.is_uri(body_path) else os.path.join(tmp, "BODY.md")
        if body_file != body_path:  # a forge CLI reads a local file
            with open(body_file, "w", encoding="utf-8") as f:
                f.write(body)
        if not g.remote:
            result["note"] = (f"not pushed (gitops.remote is null): git -C {shlex.quote(repo)} push <remote> "
                              f"{shlex.quote(branch)}, then " + _how_to_open(str(g.branch), branch, title, "<remote>",
                                                                              body_file))
            return result
        target = _remote_target(str(g.remote))
        try:
            _git(work, "push", "-q", target, f"refs/heads/{branch}:refs/heads/{branch}")
        except GitError as exc:
            raise JobFailed(f"gitops.remote={g.remote}: pushing {branch} failed: {exc}",
                            {**result, "branch": branch}) from None
        result["pushed"] = True
        if g.pr_command:
            result.update(_run_pr_command(cfg, work, {"base": str(g.branch), "branch": branch, "title": title,
                                                      "body": body, "body_file": body_file, "remote": target}))
            if result["pr_error"]:
                log.warning("the proposal %s is pushed, but opening its pull request failed: %s", branch,
                            result["pr_error"])
        else:
            result["note"] = _how_to_open(str(g.branch), branch, title, _remote_url(work, target), body_file)
        return result
    finally:
        if local:
            subprocess.run(["git", "worktree", "remove", "--force", work], cwd=repo, capture_output=True)
            if result["branch"] is None:  # nothing was committed on it
                subprocess.run(["git", "branch", "-q", "-D", branch], cwd=repo, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def commit_to_branch(cfg: DictConfig, change: Change, title: str, body: str) -> dict[str, Any]:
    """Commit the serve file after `change` straight to gitops.branch of gitops.repo, the branch
    +mode=sync watches, and push it there.

    The change is applied to the serve file as that branch holds it. When the branch moved on
    meanwhile (the push is refused), the edit is made again, once, on its new head."""
    g = cfg.gitops
    if not g.repo:
        raise ConfigError("gitops.repo", g.repo, "a decision committed to the watched branch needs the repository")
    tmp = tempfile.mkdtemp(prefix="mlp-commit-")
    try:
        work = _clone(cfg, os.path.join(tmp, "work"))
        for attempt in (1, 2):
            text = _read(work, cfg)
            doc = yaml.safe_load(text) or {}
            versions, shadows = list(doc.get("versions") or []), list(doc.get("shadows") or [])
            try:
                traffic = next_traffic(versions, shadows, change)
            except ValueError as exc:
                raise JobFailed(f"{change.kind} {change.version} does not apply to {g.serve_file} on {g.branch} "
                                f"of {g.repo}: {exc}", {"branch": str(g.branch)}) from None
            new_text = edit_serve_text(text, versions, shadows, traffic)
            if new_text == text:  # the branch has this traffic already
                return {"commit": _git(work, "rev-parse", "HEAD"), "branch": str(g.branch), "repo": str(g.repo),
                        "attempts": attempt, "changed": False, **traffic.plain()}
            sha = _commit_file(work, cfg, new_text, f"{title}\n\n{body}")
            try:
                _git(work, "push", "-q", "origin", f"HEAD:refs/heads/{g.branch}")
            except GitError as exc:
                if attempt == 2 or not any(m in exc.stderr for m in _MOVED):
                    raise JobFailed(f"gitops.repo={g.repo} gitops.branch={g.branch}: push failed: {exc}",
                                    {"branch": str(g.branch), "commit": sha}) from None
                log.info("%s moved on while committing %s; applying it again on the new head", g.branch, title)
                _git(work, "fetch", "-q", "origin", f"refs/heads/{g.branch}")
                _git(work, "reset", "-q", "--hard", "FETCH_HEAD")
                continue
            return {"commit": sha, "branch": str(g.branch), "repo": str(g.repo), "attempts": attempt,
                    "changed": True, **traffic.plain()}
        raise AssertionError("unreachable")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_versions(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return list(yaml.safe_load(f)["versions"])
