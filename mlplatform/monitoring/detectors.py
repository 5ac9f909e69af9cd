"""Drift detectors behind one small interface, so the backend is a config choice.

alibi-detect is the default backend (always with `backend="pytorch"`). It is under the
Business Source License 1.1: production use needs a licence from Seldon, and it pins
numpy<2. `ScipyKS` and `ScipyChiSquare` are a second, permissively licensed backend with
the same interface; any class with `fit`/`score` and a `feature` can be named in
`conf/monitor/*.yaml` through `_target_`.

A detector watches one feature of the captured predictions:
- "embedding": the penultimate-layer embedding (covariate drift);
- "prediction": the predicted species index (prediction drift).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class DriftResult:
    detector: str
    feature: str
    is_drift: bool
    p_value: float | None  # None for online detectors (they use a threshold on a statistic)
    distance: float
    threshold: float  # on the p-value when there is one, else on the distance
    n: int  # window size scored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DriftDetector(Protocol):
    name: str
    feature: str  # "embedding" or "prediction"
    online: bool

    def fit(self, reference: np.ndarray, num_classes: int) -> None:
        """Configure on the served version's reference (from its registry entry)."""

    def score(self, window: np.ndarray) -> DriftResult:
        """A batch detector tests the window; an online one consumes it row by row."""


def _silence_alibi() -> None:
    for name in ("alibi_detect", "alibi_detect.cd", "alibi_detect.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _Base:
    feature = "embedding"
    online = False

    def __init__(self, name: str | None = None, p_val: float = 0.05) -> None:
        if not 0 < p_val < 1:
            raise ValueError(f"p_val must be in (0, 1), got {p_val}")
        self.name = name or type(self).__name__
        self.p_val = float(p_val)
        self._cd: Any = None

    def _check(self, window: np.ndarray) -> np.ndarray:
        if self._cd is None and not getattr(self, "_fitted", False):
            raise RuntimeError(f"{self.name}: fit() must run before score()")
        return np.asarray(window)


class PCA:
    """Dimensionality reduction fitted on the reference (for per-feature tests like KS)."""

    def __init__(self, n_components: int) -> None:
        self.n_components = int(n_components)

    def fit(self, x: np.ndarray) -> PCA:
        x = np.asarray(x, np.float64)
        self.mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vt[: max(1, min(self.n_components, vt.shape[0]))]
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) @ self.components.T).astype(np.float32)


# ----------------------------------------------------------------------------- alibi-detect


class AlibiMMD(_Base):
    """Maximum mean discrepancy on embeddings, permutation test. Cost grows with
    (n_ref + n)^2: the kernel matrix over reference and window."""

    def __init__(self, *, n_permutations: int, name: str | None = None, p_val: float = 0.05,
                 device: str = "cpu") -> None:
        super().__init__(name or "mmd", p_val)
        self.n_permutations, self.device = int(n_permutations), device

    def fit(self, reference: np.ndarray, num_classes: int) -> None:
        from alibi_detect.cd import MMDDrift

        _silence_alibi()
        self._cd = MMDDrift(np.asarray(reference, np.float32), backend="pytorch", p_val=self.p_val,
                            n_permutations=self.n_permutations, device=self.device)

    def score(self, window: np.ndarray) -> DriftResult:
        d = self._cd.predict(self._check(window).astype(np.float32), return_p_val=True,
                             return_distance=True)["data"]
        return DriftResult(self.name, self.feature, bool(d["is_drift"]), float(d["p_val"]),
                           float(d["distance"]), float(d["threshold"]), len(window))


class AlibiKS(_Base):
    """Kolmogorov-Smirnov per principal component of the embeddings (fitted on the
    reference), Bonferroni-corrected across components."""

    def __init__(self, *, n_components: int, name: str | None = None, p_val: float = 0.05) -> None:
        super().__init__(name or "ks", p_val)
        self.n_components = int(n_components)

    def fit(self, reference: np.ndarray, num_classes: int) -> None:
        from alibi_detect.cd import KSDrift

        _silence_alibi()
        self.pca = PCA(self.n_components).fit(reference)
        self._cd = KSDrift(self.pca(reference), p_val=self.p_val, correction="bonferroni")

    def score(self, window: np.ndarray) -> DriftResult:
        d = self._cd.predict(self.pca(self._check(window)), return_p_val=True, return_distance=True)["data"]
        # The family's evidence: the smallest per-component p-value, Bonferroni-adjusted.
        p = float(min(1.0, np.min(d["p_val"]) * len(d["p_val"])))
        return DriftResult(self.name, self.feature, bool(d["is_drift"]), p, float(np.max(d["distance"])),
                           self.p_val, len(window))


class AlibiChiSquare(_Base):
    """Chi-squared homogeneity test on the predicted species: did the mix of answers change?

    Only species seen in the reference or the window take part: a species absent from both
    is an all-zero column, which has no expected frequency (alibi would raise)."""

    feature = "prediction"

    def __init__(self, name: str | None = None, p_val: float = 0.05) -> None:
        super().__init__(name or "chi2", p_val)

    def fit(self, reference: np.ndarray, num_classes: int) -> None:
        _silence_alibi()
        self.ref = np.asarray(reference, np.int64).ravel()
        self._fitted = True

    def score(self, window: np.ndarray) -> DriftResult:
        from alibi_detect.cd import ChiSquareDrift

        x = self._check(window).astype(np.int64).ravel()
        present = np.union1d(np.unique(self.ref), np.unique(x))
        if len(present) < 2:
            return DriftResult(self.name, self.feature, False, 1.0, 0.0, self.p_val, len(x))
        remap = {c: i for i, c in enumerate(present)}
        ref = np.array([remap[c] for c in self.ref]).reshape(-1, 1)
        cd = ChiSquareDrift(ref, p_val=self.p_val, categories_per_feature={0: len(present)})
        d = cd.predict(np.array([remap[c] for c in x]).reshape(-1, 1), return_p_val=True,
                       return_distance=True)["data"]
        return DriftResult(self.name, self.feature, bool(d["is_drift"]), float(np.min(d["p_val"])),
                           float(np.max(d["distance"])), float(d["threshold"]), len(x))


class AlibiMMDOnline(_Base):
    """Online MMD on embeddings for streams: a sliding window, a threshold configured by
    bootstrap for the expected run time (ert) between false alarms."""

    online = True

    def __init__(self, *, ert: float, window_size: int, n_bootstraps: int, name: str | None = None,
                 device: str = "cpu") -> None:
        super().__init__(name or "mmd_online", 0.05)
        self.ert, self.window_size, self.n_bootstraps, self.device = float(ert), int(window_size), \
            int(n_bootstraps), device
        if self.n_bootstraps < 2 * self.ert:  # alibi estimates the 1 - 1/ert quantile by bootstrap
            raise ValueError(f"{self.name}: n_bootstraps={self.n_bootstraps} must be at least 2 x ert "
                             f"({2 * self.ert:g}) to calibrate the threshold")

    def fit(self, reference: np.ndarray, num_classes: int) -> None:
        from alibi_detect.cd import MMDDriftOnline

        _silence_alibi()
        ref = np.asarray(reference, np.float32)
        if len(ref) < 2 * self.window_size:
            raise ValueError(f"{self.name}: reference has {len(ref)} rows; needs at least 2 x window_size "
                             f"({2 * self.window_size})")
        self._cd = MMDDriftOnline(ref, ert=self.ert, window_size=self.window_size, backend="pytorch",
                                  n_bootstraps=self.n_bootstraps, device=self.device, verbose=False)

    def score(self, window: np.ndarray) -> DriftResult:
        """Feed each row; drift if the statistic crossed the threshold at any step. After a
        detection the detector restarts, as alibi recommends."""
        x = self._check(window).astype(np.float32)
        drift, top_stat, top_thr = False, -np.inf, np.inf
        for row in x:
            d = self._cd.predict(row, return_test_stat=True)["data"]
            stat, thr = float(d["test_stat"]), float(d["threshold"])
            if stat - thr > top_stat - top_thr:
                top_stat, top_thr = stat, thr
            if d["is_drift"]:
                drift = True
                self._cd.reset_state()
        return DriftResult(self.name, self.feature, drift, None, top_stat, top_thr, len(x))


# ----------------------------------------------------------------------------- scipy (permissive licence)


class ScipyKS(_Base):
    """KS per principal component with scipy only: a non-BSL backend with the same interface."""

    def __init__(self, *, n_components: int, name: str | None = None, p_val: float = 0.05) -> None:
        super().__init__(name or "ks_scipy", p_val)
        self.n_components = int(n_components)

    def fit(self, reference: np.ndarray, num_classes: int) -> None:
        self.pca = PCA(self.n_components).fit(reference)
        self.ref = self.pca(reference)
        self._fitted = True

    def score(self, window: np.ndarray) -> DriftResult:
        from scipy.stats import ks_2samp

        x = self.pca(self._check(window))
        tests = [ks_2samp(self.ref[:, j], x[:, j]) for j in range(self.ref.shape[1])]
        p = float(min(1.0, min(t.pvalue for t in tests) * len(tests)))
        return DriftResult(self.name, self.feature, p < self.p_val, p, float(max(t.statistic for t in tests)),
                           self.p_val, len(x))


class ScipyChiSquare(_Base):
    """Chi-squared homogeneity test on predicted species with scipy only."""

    feature = "prediction"

    def __init__(self, name: str | None = None, p_val: float = 0.05) -> None:
        super().__init__(name or "chi2_scipy", p_val)

    def fit(self, reference: np.ndarray, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.ref = np.bincount(np.asarray(reference, np.int64), minlength=self.num_classes)
        self._fitted = True

    def score(self, window: np.ndarray) -> DriftResult:
        from scipy.stats import chi2_contingency

        cur = np.bincount(self._check(window).astype(np.int64), minlength=self.num_classes)
        table = np.stack([self.ref, cur])
        table = table[:, table.sum(0) > 0]
        if table.shape[1] < 2:
            return DriftResult(self.name, self.feature, False, 1.0, 0.0, self.p_val, len(window))
        stat, p, _, _ = chi2_contingency(table)
        return DriftResult(self.name, self.feature, bool(p < self.p_val), float(p), float(stat), self.p_val,
                           len(window))


def build(detectors_cfg: dict[str, Any], budget: float | None = None) -> list[DriftDetector]:
    """Instantiate the configured detectors (`_target_`), logging each target first. With a
    p-value budget, batch detectors that don't set p_val share it (Bonferroni), so the
    per-window false-alarm rate of the family stays within the budget."""
    from hydra.utils import instantiate

    entries = {k: dict(v) for k, v in (detectors_cfg or {}).items() if v}
    out: list[DriftDetector] = []
    for name, spec in entries.items():
        log.info("building drift detector %s: %s", name, spec.get("_target_"))
        out.append(instantiate({**spec, "name": name}))
    batch = [d for d in out if not d.online]
    if budget is not None and batch:
        for d, spec in zip(out, entries.values(), strict=True):
            if not d.online and "p_val" not in spec:
                d.p_val = budget / len(batch)
    return out
