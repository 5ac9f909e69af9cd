"""GitOps proposals: the serve file a proposal writes composes (with Hydra, from conf/) to
exactly the serve config `rollout.apply=true` deploys, and the edit changes only the values
the step changes: comments, key order, flow or block style and per-version keys stay.
Proposals become pushed branches with a pull request's title and body, and a decision
commits straight to the watched branch; a local bare repository plays the forge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mlplatform.cli_check import compose_checked
from mlplatform.config import validate_serve
from mlplatform.deployments.serve_mode import deploy_schema, resolve_settings
from mlplatform.pipeline import gitops, rollout
from mlplatform.registry.store import Registry

from .conftest import CONF, ROOT, compose

SERVE_FILE = ROOT / "conf" / "serve" / "default.yaml"

# conf/serve/default.yaml with this in place of its versions and shadows: comments on and
# between entries, deployment overrides in block and flow style, a shadow with its own.
TRAFFIC = """\
versions:
  # the version production runs
  - ref: production       # a registry alias
    role: stable
    weight: 90
    deployment:
      num_cpus: 0.5       # a small stable
      target_ongoing_requests: 2
  # today's candidate
  - ref: candidate
    role: canary
    weight: 10
    deployment: {max_replicas: 3, max_replicas_per_node: 1}
shadows:                  # mirrored, never answered
  - ref: v3               # the next candidate
    mirror: 0.1
    deployment:
      num_cpus: 0.25
"""
# The same with the canary (the alias `candidate`: v2) mirrored as a shadow too.
MIRROR = "  - {ref: v2, mirror: 0.5}  # the canary itself, for the agreement check\n"
MIRRORED = TRAFFIC.replace("# mirrored, never answered\n", "# mirrored, never answered\n" + MIRROR)

ADVANCED = """\
versions:
  # the version production runs
  - ref: production       # a registry alias
    role: stable
    weight: 50
    deployment:
      num_cpus: 0.5       # a small stable
      target_ongoing_requests: 2
  # today's candidate
  - ref: v2
    role: canary
    weight: 50
    deployment: {max_replicas: 3, max_replicas_per_node: 1}
shadows:                  # mirrored, never answered
  - ref: v3               # the next candidate
    mirror: 0.1
    deployment:
      num_cpus: 0.25
"""

PROMOTED = """\
versions:
  # the version production runs
  # today's candidate
  - ref: v2
    role: stable
    weight: 100
    deployment: {max_replicas: 3, max_replicas_per_node: 1}
shadows:                  # mirrored, never answered
  - ref: v3               # the next candidate
    mirror: 0.1
    deployment:
      num_cpus: 0.25
"""

ROLLED_BACK = """\
versions:
  # the version production runs
  - ref: production       # a registry alias
    role: stable
    weight: 100
    deployment:
      num_cpus: 0.5       # a small stable
      target_ongoing_requests: 2
shadows:                  # mirrored, never answered
  - ref: v3               # the next candidate
    mirror: 0.1
    deployment:
      num_cpus: 0.25
"""


def _with_traffic(text: str, traffic: str) -> str:
    """`text` (a serve file) with `traffic` in place of its versions and shadows."""
    lines = text.splitlines(keepends=True)
    start = [i for i, ln in enumerate(lines) if ln.startswith("versions:")]
    end = [i for i, ln in enumerate(lines) if ln.startswith("shadows:")]
    assert len(start) == len(end) == 1 and lines[end[0]].startswith("shadows: []"), "the layout this test knows"
    return "".join(lines[:start[0]]) + traffic + "".join(lines[end[0] + 1:])


def _set(entry: dict) -> dict:
    """An entry without unset (None) override keys: what its YAML says."""
    return {k: _set(v) if isinstance(v, dict) else v for k, v in entry.items() if v is not None}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout's conf/, and a registry: production -> v1, candidate -> v2 (v3 unaliased)."""
    shutil.copytree(CONF, tmp_path / "conf")
    reg = Registry(str(tmp_path / "root" / "registry"), "species-classifier")
    for _ in range(3):
        reg.register({"w": torch.zeros(2)}, {"labels": ["a", "b"], "metrics": {}})
    reg.set_alias("production", "v1")
    reg.set_alias("candidate", "v2")
    monkeypatch.chdir(tmp_path)  # gitops.serve_file is relative to the checkout
    return tmp_path


def _propose_and_apply(site: Path, traffic: str, decision: str, *extra: str) -> tuple[gitops.Change, str, dict]:
    """The proposal's serve file for `decision` from conf/serve with `traffic`, after checking
    that conf/ with it in place composes to the config apply deploys; returns the change, the
    file and that serve config."""
    (site / "conf" / "serve" / "default.yaml").write_text(_with_traffic(SERVE_FILE.read_text(), traffic))
    overrides = ["+mode=rollout", f"paths.root={site / 'root'}", *extra]
    cfg = compose_checked(str(site / "conf"), overrides)
    _, canary = rollout.serve_versions(cfg)
    change = rollout.next_change(decision, canary, list(cfg.rollout.steps))
    proposal = gitops.propose(cfg, change, f"{decision} {canary['version']}", "evidence", decision)
    deployed = gitops.applied(cfg, change)  # what rollout.apply=true hands to deploy()
    validate_serve(deployed.serve)

    proposed_conf = site / "proposed" / decision / "conf"
    shutil.copytree(site / "conf", proposed_conf)
    shutil.copy(proposal["serve_file"], proposed_conf / "serve" / "default.yaml")
    composed = compose_checked(str(proposed_conf), overrides)
    assert OmegaConf.to_container(composed, resolve=True) == OmegaConf.to_container(deployed, resolve=True)
    return change, Path(proposal["serve_file"]).read_text(), OmegaConf.to_container(deployed.serve, resolve=True)


def test_advance_proposal_is_what_apply_deploys(site: Path) -> None:
    change, text, serve = _propose_and_apply(site, TRAFFIC, "advance")
    assert (change.kind, change.weight) == ("advance", 50)
    assert text == _with_traffic(SERVE_FILE.read_text(), ADVANCED)
    assert [_set(v) for v in serve["versions"]] == [
        {"ref": "production", "role": "stable", "weight": 50, "deployment": {"num_cpus": 0.5, "target_ongoing_requests": 2}},
        {"ref": "v2", "role": "canary", "weight": 50, "deployment": {"max_replicas": 3, "max_replicas_per_node": 1}}]
    assert [_set(sh) for sh in serve["shadows"]] == [{"ref": "v3", "mirror": 0.1, "deployment": {"num_cpus": 0.25}}]
    # and the serve config that deploys it carries each version's own Serve options
    cfg = compose_checked(str(site / "conf"), ["+mode=rollout", f"paths.root={site / 'root'}"])
    apps = deploy_schema(cfg, resolve_settings(gitops.applied(cfg, change), read_secrets=False)).applications
    options = {d.name: d for a in apps for d in a.deployments}  # one application per version
    assert options["model-v1"].autoscaling_config["target_ongoing_requests"] == 2
    assert "max_replicas_per_node" not in options["model-v1"].model_dump(exclude_unset=True)
    assert options["model-v2"].autoscaling_config["max_replicas"] == 3
    assert options["model-v2"].max_replicas_per_node == 1


def test_promote_proposal_is_what_apply_deploys(site: Path) -> None:
    change, text, serve = _propose_and_apply(site, MIRRORED, "advance", "rollout.steps=[10,100]")
    assert (change.kind, change.version) == ("promote", "v2")
    assert text == _with_traffic(SERVE_FILE.read_text(), PROMOTED)
    assert [_set(v) for v in serve["versions"]] == [
        {"ref": "v2", "role": "stable", "weight": 100, "deployment": {"max_replicas": 3, "max_replicas_per_node": 1}}]
    # A stable version cannot be a shadow too: the mirror of the promoted canary goes.
    assert [_set(sh) for sh in serve["shadows"]] == [{"ref": "v3", "mirror": 0.1, "deployment": {"num_cpus": 0.25}}]


def test_rollback_proposal_is_what_apply_deploys(site: Path) -> None:
    change, text, serve = _propose_and_apply(site, MIRRORED, "rollback")
    assert change.kind == "rollback"
    assert text == _with_traffic(SERVE_FILE.read_text(), ROLLED_BACK)
    assert [_set(v) for v in serve["versions"]] == [
        {"ref": "production", "role": "stable", "weight": 100, "deployment": {"num_cpus": 0.5, "target_ongoing_requests": 2}}]
    # The rolled-back canary's mirror goes with it; the other shadow stays as it was.
    assert [_set(sh) for sh in serve["shadows"]] == [{"ref": "v3", "mirror": 0.1, "deployment": {"num_cpus": 0.25}}]


def test_hold_proposes_nothing() -> None:
    assert rollout.next_change("hold", {"version": "v2", "weight": 10}, [10, 50, 100]) is None


def test_new_canary_from_the_pipeline_leaves_its_shadow(site: Path) -> None:
    """The pipeline's proposal: a candidate that was mirrored becomes a canary, so it is no
    longer a shadow (a served version cannot be one), and stable is pinned to its version."""
    serve = site / "conf" / "serve" / "default.yaml"
    serve.write_text(_with_traffic(SERVE_FILE.read_text(), """\
versions:
  - ref: production       # a registry alias
    role: stable
    weight: 100
shadows:                  # mirrored, never answered
  - ref: v3               # the next candidate
    mirror: 0.1
# sticky sessions
"""))
    cfg = compose_checked(str(site / "conf"), ["+mode=pipeline", f"paths.root={site / 'root'}"])
    change = gitops.Change("canary", "v3", 20, stable="v1")
    text = Path(gitops.propose(cfg, change, "canary v3", "evidence", "canary")["serve_file"]).read_text()
    assert text == _with_traffic(SERVE_FILE.read_text(), """\
versions:
  - ref: v1               # a registry alias
    role: stable
    weight: 80
  - ref: v3
    role: canary
    weight: 20
shadows: []               # mirrored, never answered
# sticky sessions
""")
    deployed = OmegaConf.to_container(gitops.applied(cfg, change).serve, resolve=True)
    assert [(v["ref"], v["weight"]) for v in deployed["versions"]] == [("v1", 80), ("v3", 20)]
    assert deployed["shadows"] == []


@pytest.mark.parametrize("text", [SERVE_FILE.read_text(), _with_traffic(SERVE_FILE.read_text(), MIRRORED)],
                         ids=["repo", "traffic"])
def test_an_edit_that_changes_nothing_changes_no_byte(text: str) -> None:
    import yaml

    doc = yaml.safe_load(text)
    same = gitops.Traffic(list(enumerate(doc["versions"])), list(enumerate(doc["shadows"])))
    assert gitops.edit_serve_text(text, doc["versions"], doc["shadows"], same) == text


def test_flow_style_and_keys_the_schema_does_not_know_survive() -> None:
    text = """\
# traffic
versions: [{ref: v1, role: stable, weight: 90, rollout_note: keep me}, {ref: v2, role: canary, weight: 10}]
shadows:
- ref: v9
  mirror: 0.2
  owner: team-b           # not a schema key yet
top_k: 5
"""
    versions, shadows = [{"ref": "v1", "role": "stable", "weight": 90}, {"ref": "v2", "role": "canary", "weight": 10}], \
        [{"ref": "v9", "mirror": 0.2}]
    traffic = gitops.next_traffic(versions, shadows, gitops.Change("advance", "v2", 50))
    assert gitops.edit_serve_text(text, versions, shadows, traffic) == text.replace("90", "50").replace("10}", "50}")


def test_the_repo_serve_file_changes_only_where_the_traffic_does() -> None:
    text = SERVE_FILE.read_text()
    assert "  - ref: production       # a version id (v3) or a registry alias\n" in text
    versions, shadows = [{"ref": "production", "role": "stable", "weight": 100}], []
    traffic = gitops.next_traffic(versions, shadows, gitops.Change("canary", "v3", 10, stable="v2"))
    assert gitops.edit_serve_text(text, versions, shadows, traffic) == text.replace(
        "  - ref: production       # a version id (v3) or a registry alias\n"
        "    role: stable\n"
        "    weight: 100\n",
        "  - ref: v2               # a version id (v3) or a registry alias\n"
        "    role: stable\n"
        "    weight: 90\n"
        "  - ref: v3\n"
        "    role: canary\n"
        "    weight: 10\n")


# ----------------------------------------------------------------------------- pushed proposals

# The repository's serve file after a canary v3 at 10% beside v2.
CANARY_V3 = SERVE_FILE.read_text().replace(
    "  - ref: production       # a version id (v3) or a registry alias\n    role: stable\n    weight: 100\n",
    "  - ref: v2               # a version id (v3) or a registry alias\n    role: stable\n    weight: 90\n"
    "  - ref: v3\n    role: canary\n    weight: 10\n")
# A title a shell would act on, were one to read it.
TITLE = "Canary v3 at 10%: $(touch pwned) `touch pwned` 'quoted' \"double\""


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def forge(tmp_path: Path) -> dict[str, Path]:
    """A bare repository (the forge) whose main holds the repo's serve file; a team member's
    checkout of it; a registry where v3 has a model card."""
    bare, seed = tmp_path / "config.git", tmp_path / "seed"
    _git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    (seed / "conf" / "serve").mkdir(parents=True)
    shutil.copy(SERVE_FILE, seed / "conf" / "serve" / "default.yaml")
    _git(seed, "init", "-q", "-b", "main")
    _git(seed, "add", ".")
    _git(seed, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "serve config")
    _git(seed, "push", "-q", str(bare), "main")
    _git(tmp_path, "clone", "-q", str(bare), "checkout")
    reg = Registry(str(tmp_path / "root" / "registry"), "species-classifier")
    for i in range(3):
        reg.register({"w": torch.zeros(2)}, {"labels": ["a", "b"], "metrics": {}},
                     files={"model_card.md": f"# v{i + 1}\n".encode()})
    return {"bare": bare, "seed": seed, "checkout": tmp_path / "checkout", "root": tmp_path / "root"}


def _cfg(forge: dict[str, Path], *extra: str, pr_command: str | None = None):
    cfg = compose("+mode=rollout", f"paths.root={forge['root']}", *extra)
    if pr_command is not None:  # set after composing: a Hydra override would need its own quoting
        OmegaConf.update(cfg, "gitops.pr_command", pr_command)
        from mlplatform.config.validate import validate_gitops

        validate_gitops(cfg.gitops)
    return cfg


def _on_remote(bare: Path, branch: str) -> tuple[str, str]:
    """(commit, serve file) of `branch` on the bare repository, as a forge would show them."""
    line = _git(bare, "ls-remote", str(bare), f"refs/heads/{branch}")
    assert line, f"{branch} is not on the remote"
    return line.split()[0], _git(bare, "show", f"{branch}:conf/serve/default.yaml") + "\n"


CANARY = gitops.Change("canary", "v3", 10, stable="v2")


def test_a_proposal_is_pushed_from_the_base_branch_with_its_body(forge: dict[str, Path]) -> None:
    checkout = forge["checkout"]
    # The checkout is on some other work: the proposal still starts from main.
    _git(checkout, "checkout", "-q", "-b", "wip")
    (checkout / "conf" / "serve" / "default.yaml").write_text(SERVE_FILE.read_text().replace("top_k: 5", "top_k: 9"))
    _git(checkout, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "unrelated work")
    head = _git(checkout, "rev-parse", "HEAD")

    cfg = _cfg(forge, f"gitops.repo={checkout}", "gitops.remote=origin")
    p = gitops.propose(cfg, CANARY, TITLE, "| | requests |\n|---|---|\n| canary v3 | 812 |", "v3-canary-10",
                       links={"report": "/reports/v3.md"})
    assert p["pushed"] and p["branch"].startswith("rollout/v3-canary-10-") and p["pr_url"] is None
    commit, text = _on_remote(forge["bare"], p["branch"])
    assert commit == p["commit"] and text == CANARY_V3
    assert _git(checkout, "rev-parse", f"{commit}^") == _git(forge["bare"], "rev-parse", "main")
    assert _git(checkout, "rev-parse", "HEAD") == head and _git(checkout, "status", "--porcelain") == ""

    body = Path(p["body"]).read_text()
    card = Registry(str(forge["root"] / "registry"), "species-classifier").path("v3", "model_card.md")
    assert body.startswith(f"# {TITLE}\n\n| | requests |\n|---|---|\n| canary v3 | 812 |\n")
    assert "| version | v3 | canary | 10 |" in body and f"- model card: `{card}`" in body
    assert "- report: `/reports/v3.md`" in body
    assert body == f"# {TITLE}\n\n" + (Path(p["body"]).parent / "BODY.md").read_text()
    assert _git(forge["bare"], "log", "-1", "--format=%B", p["branch"]) + "\n" == f"{TITLE}\n\n" + body.split("\n\n", 1)[1]
    # no forge CLI: the note says how to open it, the values filled in
    assert f"git -C proposal diff origin/main...origin/{p['branch']}" in p["note"]
    assert f"gh pr create --base main --head {p['branch']} --title " in p["note"] and "BODY.md" in p["note"]


def _recorder(tmp_path: Path, code: int = 0) -> Path:
    """A forge CLI stand-in: a real process that records its argv and answers like gh."""
    script = tmp_path / "forge-cli"
    script.write_text(f"""#!{sys.executable}
import json, sys
json.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, "w"))
if {code}:
    sys.stderr.write("error: no token for the forge\\nsee the docs\\n")
    sys.exit({code})
print("Creating pull request for rollout into main\\n\\nhttps://forge.example/team/config/pull/7")
""")
    script.chmod(0o755)
    return script


def test_pr_command_opens_the_pull_request_without_a_shell(forge: dict[str, Path], tmp_path: Path) -> None:
    cli = _recorder(tmp_path)
    cfg = _cfg(forge, f"gitops.repo={forge['checkout']}", f"gitops.remote={forge['bare']}",
               pr_command=f"{cli} pr create --base {{base}} --head {{branch}} --title {{title}} "
                          "--body-file {body_file} --repo={remote} --body {body}")
    p = gitops.propose(cfg, CANARY, TITLE, "evidence", "v3-canary-10")
    assert p["pushed"] and p["pr_url"] == "https://forge.example/team/config/pull/7" and p["pr_error"] is None
    assert p["note"] is None
    body_file = str(Path(p["body"]).parent / "BODY.md")
    body = Path(body_file).read_text()
    assert json.loads((tmp_path / "argv.json").read_text()) == [
        "pr", "create", "--base", "main", "--head", p["branch"], "--title", TITLE, "--body-file", body_file,
        f"--repo={forge['bare']}", "--body", body]
    assert not list(tmp_path.rglob("pwned"))
    assert _on_remote(forge["bare"], p["branch"])[1] == CANARY_V3


def test_a_failing_pr_command_keeps_the_pushed_branch(forge: dict[str, Path], tmp_path: Path) -> None:
    cli = _recorder(tmp_path, code=3)
    cfg = _cfg(forge, f"gitops.repo={forge['checkout']}", "gitops.remote=origin",
               pr_command=f"{cli} pr create --head {{branch}}")
    p = gitops.propose(cfg, CANARY, "Canary v3 at 10%", "evidence", "v3-canary-10")
    assert p["pushed"] and p["pr_url"] is None
    assert p["pr_error"] == f"gitops.pr_command {cli} exited 3: error: no token for the forge"
    assert _on_remote(forge["bare"], p["branch"]) == (p["commit"], CANARY_V3)
    # a CLI that is not there is reported the same way
    OmegaConf.update(cfg, "gitops.pr_command", str(tmp_path / "no-such-cli") + " {branch}")
    p = gitops.propose(cfg, CANARY, "Canary v3 at 10%", "evidence", "v3-canary-10b")
    assert p["pushed"] and "no-such-cli" in p["pr_error"] and _on_remote(forge["bare"], p["branch"])[1] == CANARY_V3


def test_a_repo_given_as_a_url_is_cloned(forge: dict[str, Path]) -> None:
    url = forge["bare"].as_uri()
    p = gitops.propose(_cfg(forge, f"gitops.repo={url}", "gitops.remote=origin"), CANARY, "Canary v3", "ev",
                       "v3-canary-10")
    assert p["pushed"] and _on_remote(forge["bare"], p["branch"]) == (p["commit"], CANARY_V3)
    assert f"git clone -q {url} proposal" in p["note"]
    # Not pushed, a clone's branch would be lost: the note says so, the files stay.
    p = gitops.propose(_cfg(forge, f"gitops.repo={url}"), CANARY, "Canary v3", "ev", "v3-canary-10-local")
    assert p["branch"] is None and not p["pushed"] and "gitops.remote" in p["note"]
    assert Path(p["serve_file"]).read_text() == CANARY_V3 and Path(p["body"]).is_file()


def test_commit_to_branch_lands_on_the_watched_branch(forge: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(forge, f"gitops.repo={forge['bare'].as_uri()}")
    out = gitops.commit_to_branch(cfg, CANARY, "Canary v3 at 10%", "evidence")
    assert out["attempts"] == 1 and _on_remote(forge["bare"], "main") == (out["commit"], CANARY_V3)

    # Someone commits to main while the next decision is being made: the push is refused as
    # non-fast-forward, and the edit is made again on top of their commit.
    seed, real_git, pushes = forge["seed"], gitops._git, []

    def git(repo: str, *args: str, **kw):
        if args[0] == "push" and not pushes:
            _git(seed, "pull", "-q", str(forge["bare"]), "main")
            path = seed / "conf" / "serve" / "default.yaml"
            path.write_text(path.read_text().replace("top_k: 5", "top_k: 3"))
            _git(seed, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "top_k 3")
            _git(seed, "push", "-q", str(forge["bare"]), "main")
        if args[0] == "push":
            pushes.append(args)
        return real_git(repo, *args, **kw)

    monkeypatch.setattr(gitops, "_git", git)
    out = gitops.commit_to_branch(cfg, gitops.Change("advance", "v3", 50), "Canary v3: 10% -> 50%", "evidence")
    assert out["attempts"] == 2 and len(pushes) == 2
    commit, text = _on_remote(forge["bare"], "main")
    assert commit == out["commit"] and _git(forge["bare"], "log", "-1", "--format=%s", f"{commit}^") == "top_k 3"
    assert text == CANARY_V3.replace("weight: 90", "weight: 50").replace("weight: 10", "weight: 50").replace(
        "top_k: 5", "top_k: 3")


def test_commit_to_branch_gives_up_after_one_retry(forge: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from mlplatform.errors import JobFailed

    cfg = _cfg(forge, f"gitops.repo={forge['bare']}")
    seed, real_git, pushes = forge["seed"], gitops._git, []

    def git(repo: str, *args: str, **kw):
        if args[0] == "push":  # main moves before every push
            pushes.append(args)
            _git(seed, "pull", "-q", str(forge["bare"]), "main")
            (seed / "note.txt").write_text(f"push {len(pushes)}")
            _git(seed, "add", "note.txt")
            _git(seed, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "busy")
            _git(seed, "push", "-q", str(forge["bare"]), "main")
        return real_git(repo, *args, **kw)

    monkeypatch.setattr(gitops, "_git", git)
    with pytest.raises(JobFailed, match=r"gitops.branch=main: push failed"):
        gitops.commit_to_branch(cfg, CANARY, "Canary v3 at 10%", "evidence")
    assert len(pushes) == 2 and _on_remote(forge["bare"], "main")[1] == SERVE_FILE.read_text()


def test_the_pipeline_proposes_with_its_evidence_table_checks_and_links(forge: dict[str, Path]) -> None:
    """The pipeline's propose step on a gate verdict: the body has the accuracy table, the gate's
    checks and the paths of the model card, the data report and the run's record."""
    from mlplatform.pipeline.run import STEPS, Context
    from mlplatform.training.gate import judge

    cfg = compose("+mode=pipeline", f"paths.root={forge['root']}", f"gitops.repo={forge['checkout']}",
                  "gitops.remote=origin", "pipeline.canary_weight=10")
    Registry(str(forge["root"] / "registry"), "species-classifier").set_alias("production", "v2")
    ctx = Context(cfg)
    candidate, baseline = {"test/acc": 0.91, "per_class": {}}, {"test/acc": 0.88, "per_class": {}}
    gate = judge(candidate, baseline, cfg.train.gate, "v3", "v2")
    gate["slices"] = {"drifted": {"candidate": {"acc": 0.8}, "production": {"acc": 0.55}}}
    ctx.outputs = {"register": {"version": "v3", "blessed": True}, "gate": gate,
                   "evaluate": {"candidate_test": candidate, "baseline_test": baseline},
                   "validate": {"snapshot_id": "snap-1", "report_md": "/data/snap-1/report.md"},
                   "snapshot": {"captured_files": 42}}
    out = STEPS["propose"](ctx)[1]()
    assert out["proposed"] and out["pushed"] and _on_remote(forge["bare"], out["branch"]) == (out["commit"], CANARY_V3)
    body = Path(out["body"]).read_text()
    assert body.startswith("# Canary v3 at 10% beside v2\n")
    assert "| test split | 0.9100 | 0.8800 |" in body and "| slice drifted | 0.8000 | 0.5500 |" in body
    assert "| min_gain | pass | 0.03 | " in body and "| max_recall_drop | pass |" in body
    card = Registry(str(forge["root"] / "registry"), "species-classifier").path("v3", "model_card.md")
    assert f"- model card: `{card}`" in body and "- data report: `/data/snap-1/report.md`" in body
    assert f"- pipeline run: `{forge['root'] / 'pipeline' / 'runs' / ctx.run_id}.json`" in body


def test_a_change_the_branch_has_already_commits_nothing(forge: dict[str, Path]) -> None:
    cfg = _cfg(forge, f"gitops.repo={forge['bare']}")
    first = gitops.commit_to_branch(cfg, CANARY, "Canary v3 at 10%", "evidence")
    again = gitops.commit_to_branch(cfg, CANARY, "Canary v3 at 10%", "evidence")
    assert first["changed"] and not again["changed"] and again["commit"] == first["commit"]
    _git(forge["checkout"], "pull", "-q")
    # the checkout's config, composed, serves what main has
    cfg = _cfg(forge, f"gitops.repo={forge['checkout']}", "gitops.remote=origin",
               "serve.versions=[{ref: v2, role: stable, weight: 90}, {ref: v3, role: canary, weight: 10}]")
    p = gitops.propose(cfg, CANARY, "Canary v3", "ev", "v3-canary-10")
    assert p["branch"] is None and not p["pushed"] and "nothing to propose" in p["note"]
    assert _git(forge["checkout"], "branch", "--list", "rollout/*") == ""
    assert _git(forge["bare"], "branch", "--list", "rollout/*") == ""
