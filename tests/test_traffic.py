"""The traffic policy on its own: weights, sticky keys, shadow sampling (no Serve needed)."""

from __future__ import annotations

from collections import Counter

import pytest

from mlplatform.deployments.traffic import TrafficPolicy

CFG = {"routes": [{"version": "v3", "role": "stable", "weight": 90},
                  {"version": "v4", "role": "canary", "weight": 10}],
       "shadows": [{"version": "v5", "mirror": 0.2}]}


def test_weights_split_traffic_within_binomial_bounds() -> None:
    p = TrafficPolicy.from_config(CFG, seed=1)
    n = 20000
    counts = Counter(p.choose() for _ in range(n))
    sd = (n * 0.1 * 0.9) ** 0.5
    assert abs(counts["v4"] - n * 0.1) < 4 * sd
    shadowed = sum(bool(p.shadows_for_request()) for _ in range(n))
    assert abs(shadowed - n * 0.2) < 4 * (n * 0.2 * 0.8) ** 0.5


def test_sticky_keys_are_stable_and_spread() -> None:
    p = TrafficPolicy.from_config(CFG, seed=1)
    q = TrafficPolicy.from_config(CFG, seed=99)
    keys = [f"user-{i}" for i in range(5000)]
    assert [p.choose(k) for k in keys] == [q.choose(k) for k in keys]  # not random: hashed
    share = sum(p.choose(k) == "v4" for k in keys) / len(keys)
    assert 0.08 < share < 0.12


def test_zero_weight_never_chosen_and_bad_sums_refused() -> None:
    p = TrafficPolicy.from_config({"routes": [{"version": "v1", "role": "stable", "weight": 100},
                                              {"version": "v2", "role": "canary", "weight": 0}]}, seed=0)
    assert {p.choose() for _ in range(2000)} == {"v1"}
    with pytest.raises(ValueError, match="sum to 100"):
        TrafficPolicy.from_config({"routes": [{"version": "v1", "role": "stable", "weight": 90}]})


def test_describe_is_the_models_contract() -> None:
    assert TrafficPolicy.from_config(CFG).describe() == [
        {"version": "v3", "role": "stable", "weight": 90},
        {"version": "v4", "role": "canary", "weight": 10},
        {"version": "v5", "role": "shadow", "mirror": 0.2}]


def _schema(app: str, routes: dict[str, int], shadows: tuple[str, ...] = ()):
    from ray.serve.schema import ServeDeploySchema

    traffic = {"routes": [{"version": v, "role": "stable" if i == 0 else "canary", "weight": w}
                          for i, (v, w) in enumerate(routes.items())],
               "shadows": [{"version": v, "mirror": 1.0} for v in shadows]}
    apps = [{"name": app, "route_prefix": "/", "import_path": "mlplatform.deployments.app:build_app",
             "args": {"settings": {}}, "deployments": [{"name": "Ingress", "user_config": traffic}]}]
    apps += [{"name": f"{app}-{v}", "route_prefix": None, "import_path": "mlplatform.deployments.app:build_model",
              "args": {"settings": {"version": v}}, "deployments": [{"name": f"model-{v}"}]}
             for v in [*routes, *shadows]]
    return ServeDeploySchema.model_validate({"applications": apps})


def _phases(desired, running) -> list[tuple[list[str], list[str]]]:
    """Each phase as (applications, versions the ingress routes to)."""
    from mlplatform.deployments.serve_mode import rollout_phases

    running_cfg = {a.name: a.model_dump(exclude_unset=True) for a in running.applications} if running else {}
    out = []
    for phase in rollout_phases("sp", desired, running_cfg):
        ingress = next(a for a in phase.applications if a.name == "sp").deployments[0].user_config
        out.append((sorted(a.name for a in phase.applications),
                    sorted(r["version"] for r in [*ingress["routes"], *ingress["shadows"]])))
    return out


def test_versions_are_added_before_traffic_names_them_and_retired_after() -> None:
    one, two = _schema("sp", {"v1": 100}), _schema("sp", {"v1": 90, "v2": 10})
    # A first deploy, or a weight change: one step.
    assert _phases(one, None) == [(["sp", "sp-v1"], ["v1"])]
    assert _phases(_schema("sp", {"v1": 70, "v2": 30}), two) == [(["sp", "sp-v1", "sp-v2"], ["v1", "v2"])]
    # A canary added: its application first, while the ingress still routes to v1 alone.
    assert _phases(two, one) == [(["sp", "sp-v1", "sp-v2"], ["v1"]), (["sp", "sp-v1", "sp-v2"], ["v1", "v2"])]
    # Retired: the ingress stops routing to it first, its application goes after.
    assert _phases(one, two) == [(["sp", "sp-v1", "sp-v2"], ["v1"]), (["sp", "sp-v1"], ["v1"])]
    # A shadow swapped for another: added, rerouted, retired.
    assert _phases(_schema("sp", {"v1": 100}, ("v4",)), _schema("sp", {"v1": 100}, ("v3",))) == [
        (["sp", "sp-v1", "sp-v3", "sp-v4"], ["v1", "v3"]), (["sp", "sp-v1", "sp-v3", "sp-v4"], ["v1", "v4"]),
        (["sp", "sp-v1", "sp-v4"], ["v1", "v4"])]
