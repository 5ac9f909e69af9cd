"""Traffic policy: weighted stable/canary choice, sticky keys, shadow mirroring.

Pure logic (no Serve), so the split can be tested exactly and changed live: the ingress
holds one `TrafficPolicy` and swaps it when its user_config changes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Route:
    version: str
    role: str  # stable or canary
    weight: int


@dataclass(frozen=True)
class Shadow:
    version: str
    mirror: float


@dataclass
class TrafficPolicy:
    routes: list[Route]
    shadows: list[Shadow] = field(default_factory=list)
    sticky_header: str | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False)

    @classmethod
    def from_config(cls, d: dict[str, Any], seed: int | None = None) -> TrafficPolicy:
        routes = [Route(r["version"], r["role"], int(r["weight"])) for r in d["routes"]]
        if sum(r.weight for r in routes) != 100:
            raise ValueError(f"traffic weights must sum to 100: {[r.weight for r in routes]}")
        shadows = [Shadow(s["version"], float(s["mirror"])) for s in d.get("shadows", [])]
        return cls(routes, shadows, d.get("sticky_header"), random.Random(seed))

    def choose(self, sticky_key: str | None = None) -> str:
        """A version for one request: by hash of the sticky key if given, else at random."""
        live = [r for r in self.routes if r.weight > 0]
        if sticky_key:
            digest = hashlib.sha256(sticky_key.encode()).digest()
            point = int.from_bytes(digest[:8], "big") % 10000 / 100.0
        else:
            point = self.rng.random() * 100.0
        acc = 0.0
        for r in live:
            acc += r.weight
            if point < acc:
                return r.version
        return live[-1].version

    def shadows_for_request(self) -> list[str]:
        return [s.version for s in self.shadows if s.mirror > 0 and self.rng.random() < s.mirror]

    def describe(self) -> list[dict[str, Any]]:
        """The GET /models listing."""
        out: list[dict[str, Any]] = [{"version": r.version, "role": r.role, "weight": r.weight}
                                     for r in self.routes]
        out += [{"version": s.version, "role": "shadow", "mirror": s.mirror} for s in self.shadows]
        return out
