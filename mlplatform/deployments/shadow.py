"""Shadow traffic: a copy of live requests to versions that never answer the client, and
how often their top-1 agrees with the version that did."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.serve.metrics import Counter, Gauge

from mlplatform.deployments.decoding import DecodedImage
from mlplatform.deployments.logs import log_event

Infer = Callable[[str, DecodedImage, int], Awaitable[dict[str, Any]]]
Capture = Callable[[str, str, str, str, DecodedImage, dict[str, Any], float, bytes | None], None]


class ShadowMirror:
    """Mirrors to shadows in background tasks, through the ingress's own `infer` (its
    batchers and timeouts) and `capture` (role "shadow"), so a shadow's answers land in
    capture like any version's."""

    def __init__(self, infer: Infer, capture: Capture) -> None:
        self.infer, self.capture = infer, capture
        self.tasks: set[asyncio.Task] = set()
        self.total = Counter("mlp_shadow_requests_total", description="Mirrored requests by outcome",
                             tag_keys=("version", "outcome"))
        self.agreement = Gauge("mlp_shadow_agreement", description="Top-1 agreement of shadow with primary",
                               tag_keys=("version",))
        self.agree_counts: dict[str, list[int]] = {}  # version -> [agreed, mirrored]

    def mirror(self, versions: list[str], image: DecodedImage, primary: dict[str, Any], request_id: str) -> None:
        for version in versions:
            task = asyncio.get_running_loop().create_task(self._shadow(version, image, primary, request_id))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _shadow(self, version: str, image: DecodedImage, primary: dict[str, Any], request_id: str) -> None:
        """Never affects the response: errors and timeouts are counted, then dropped."""
        try:
            started = time.perf_counter()
            res = await self.infer(version, image, 1)
            self.capture(request_id, version, "shadow", "shadow", image, res, started, None)
            agree = int(res["labels"][0] == primary["labels"][0])
            n = self.agree_counts.setdefault(version, [0, 0])
            n[0] += agree
            n[1] += 1
            self.agreement.set(n[0] / n[1], tags={"version": version})
            self.total.inc(tags={"version": version, "outcome": "agree" if agree else "disagree"})
        except Exception as exc:  # a failing shadow is data, never an error for the client
            self.total.inc(tags={"version": version, "outcome": "error"})
            log_event("shadow_error", logging.WARNING, version=version, request_id=request_id,
                      error=f"{type(exc).__name__}: {exc}"[:300])
