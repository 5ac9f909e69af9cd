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
