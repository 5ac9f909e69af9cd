"""The README and docs/ stay true to the repository: short README, links that resolve inside
the repository, and modes, make targets, commands and config keys that exist. No Ray."""

from __future__ import annotations

import functools
import itertools
import re
import shlex
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mlplatform.modes import MODES

from .conftest import CONF, ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

_FENCE = re.compile(r"^ *```.*?$(.*?)^ *```", re.S | re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_SPAN = re.compile(r"`([^`\n]+)`")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _code_blocks(text: str) -> list[str]:
    return _FENCE.findall(text)


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return _FENCE.sub("", text)


def _spans(text: str) -> list[str]:
    return _SPAN.findall(_prose(text))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose(page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; keep it under 250 and move depth to docs/"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_resolve_inside_the_repository(page: Path):
    text = page.read_text()
    assert "DESIGN.md" not in text and "../shared" not in text, \
        f"{_rel(page)} points to the design document, which a clone of the repository does not have"
    problems = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert not problems, f"{_rel(page)}: " + "; ".join(problems)


def test_readme_points_to_every_doc():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _LINK.findall(README.read_text())}
    missing = [_rel(p) for p in sorted((ROOT / "docs").iterdir()) if p.resolve() not in linked]
    assert not missing, f"README.md does not point to {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_modes_exist(page: Path):
    named = set(re.findall(r"\+mode=([A-Za-z_][\w-]*)", page.read_text()))
    assert named <= set(MODES), f"{_rel(page)} names modes that do not exist: {sorted(named - set(MODES))}"


def test_readme_lists_every_mode():
    named = set(re.findall(r"\+mode=(\w+)", README.read_text()))
    assert set(MODES) <= named, f"README.md does not list {sorted(set(MODES) - named)}"


def test_readme_maps_every_config_group_and_top_level_key():
    text = README.read_text()
    conf_map = next(b for b in _code_blocks(text) if b.lstrip("\n").startswith("conf/\n"))
    groups = sorted(p.name for p in Path(CONF).iterdir() if p.is_dir())
    top = sorted(k for k in yaml.safe_load((Path(CONF) / "config.yaml").read_text()) if k != "defaults")
    missing = [f"{g}/" for g in groups if not re.search(rf"^\s+{g}/", conf_map, re.M)]
    missing += [k for k in top if not re.search(rf"\b{k}\b", conf_map)]
    assert not missing, f"README.md's map of conf/ misses {missing}"


def test_make_targets_exist():
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:", (ROOT / "Makefile").read_text(), re.M))
    problems = []
    for page in PAGES:
        text = page.read_text()
        code = "\n".join(_code_blocks(text) + _spans(text))
        named = set(re.findall(r"(?:^|[\s`])make ([a-z][\w-]*)", code, re.M))
        problems += [f"{_rel(page)}: make {t}" for t in sorted(named - targets)]
    assert not problems, f"no such Makefile target: {problems}"


# ----------------------------------------------------------------------------- commands and keys

_SHELL_END = (">", "|", "&", ";", "#")
_NOT_KEYS = ("ray.tune.", "ray.train.", "ray.serve.", "ray.data.")
_FILE_SUFFIX = re.compile(r"\.(ya?ml|json|jsonl|md|py|npz|png|parquet|safetensors|txt|log|pt)$")


def _commands(page: Path) -> list[list[str]]:
    """The overrides of every `python run.py ...` shown on a page, with $X as the smoke experiment."""
    text = page.read_text()
    lines = []
    for block in _code_blocks(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += _spans(text)
    out = []
    for line in lines:
        m = re.search(r"\bpython run\.py\b(.*)", line)
        if not m or "<" in m.group(1) or "[key" in m.group(1):
            continue  # a placeholder (+mode=<mode>), not a runnable command
        args = []
        for tok in shlex.split(m.group(1).replace("$X", "+experiment=smoke"), comments=True):
            if tok.startswith(_SHELL_END):
                break
            args.append(tok)
        if "--cfg" in args:
            args = args[:args.index("--cfg")]
        if any(a.startswith("+mode=") for a in args):
            out.append(args)
    return out


def _expand(key: str) -> list[str]:
    """`a.{b,c}` -> a.b, a.c; `a[i].b` -> a[0].b; `a.*` -> a."""
    key = re.sub(r"\[[a-z]\]", "[0]", key).removesuffix(".*")
    parts = re.split(r"(\{[^}]*\})", key)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(c) for c in itertools.product(*choices)]


def _has(container: object, key: str) -> bool:
    node = container
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(node, list) or i >= len(node):
                return False
            node = node[i]
        elif isinstance(node, dict) and part.endswith("*"):  # `deploy.head_*`
            return any(str(k).startswith(part[:-1]) for k in node)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


@pytest.fixture(scope="module")
def composer():
    """Compose overrides against conf/ without validating values (paths in examples need not
    exist): an unknown key, group or mode fails, as it would on the command line."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        @functools.cache
        def composed(overrides: tuple[str, ...]) -> dict:
            return OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)), resolve=False)

        yield lambda overrides: composed(tuple(overrides))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_shown_commands_compose(page: Path, composer):
    problems = []
    for args in _commands(page):
        try:
            composer(args)
        except Exception as exc:  # Hydra's and OmegaConf's errors: the command would fail too
            problems.append(f"python run.py {' '.join(args)}: {str(exc).splitlines()[0]}")
    assert not problems, f"{_rel(page)}: " + "\n".join(problems)


def test_named_config_keys_exist(composer):
    # Keys that exist only with some options: data=captured, a search space, a shadow.
    variants = [composer([]), composer(["+mode=pipeline"]), composer(["+mode=tune"]),
                composer(["serve.shadows=[{ref: candidate, mirror: 0.2}]"])]
    top = set(variants[0])
    problems = []
    for page in PAGES:
        for span in _spans(page.read_text()):
            key = span.split("=", 1)[0].strip("'\"")
            if (not re.fullmatch(r"[a-z_]+(\.[\w{},*]+|\[[a-z0-9]\])+", key) or key.split(".")[0] not in top
                    or key.startswith(_NOT_KEYS) or _FILE_SUFFIX.search(key)):
                continue
            for k in _expand(key):
                if not any(_has(v, k) for v in variants):
                    problems.append(f"{_rel(page)}: {k}")
    assert not problems, f"config keys named in the docs that conf/ does not have: {problems}"
