"""Evaluation metrics for a multi-class classifier, in plain numpy.

Everything here is pure and deterministic so that the same numbers come out of a Ray Train
worker, an offline evaluation and a unit test; summaries hold only plain Python types so they
can go straight into JSON, W&B or a model card.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

_EPS = 1e-12
_MAX_TICK_CLASSES = 40
_ANNOTATE_MAX_CLASSES = 15


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax; subtracting the row max keeps large logits from overflowing."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=1, keepdims=True)


def top_k_from_probs(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best classes per row, best first: indices (N, k) and their scores (N, k).

    k is clipped to the number of classes so callers (serving asks for "top 5") need not know C.
    The sort is stable, so tied scores come out in class-index order: results are reproducible.
    """
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {p.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), p.shape[1])
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(p, idx, axis=1)


def _r(x: float) -> float:
    """A plain Python float rounded to 6 decimals, so summaries are stable and JSON-friendly."""
    return round(float(x), 6)


def _check(probs: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"labels must be 1-D with {p.shape[0]} entries, got shape {y.shape}")
    if num_classes is not None and p.shape[1] != num_classes:
        raise ValueError(f"expected {num_classes} classes, got {p.shape[1]} columns")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("labels must be integer class indices")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got [{y.min()}, {y.max()}]")
    return p, y


def _calibration_bins(confidence: np.ndarray, correct: np.ndarray,
                      n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin (lo, hi]: count, accuracy and mean confidence (0 where empty).

    Shared by the ECE and the reliability diagram so the plot shows exactly what is scored.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") puts a confidence equal to an edge into the bin it closes.
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    acc_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    safe = np.maximum(counts, 1.0)
    return counts, acc_sum / safe, conf_sum / safe


def _calibration(probs: np.ndarray, labels: np.ndarray, n_bins: int,
                 what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Bins (count, accuracy, mean confidence) and the ECE they give, for ECE and the diagram."""
    p, y = _check(probs, labels)
    if y.size == 0:
        raise ValueError(f"cannot compute {what} of zero samples")
    counts, acc, mean_conf = _calibration_bins(p.max(axis=1), p.argmax(axis=1) == y, n_bins)
    return counts, acc, mean_conf, float(np.sum(counts / y.size * np.abs(acc - mean_conf)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the bin-size-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    return _calibration(probs, labels, n_bins, "ECE")[3]


def summarize(probs: np.ndarray, labels: np.ndarray, label_names: list[str], prefix: str = "test",
              n_bins: int = 15) -> dict[str, Any]:
    """All evaluation numbers for one split, as one JSON-serialisable dict.

    Scalars are keyed `prefix/name` (ready for a metrics logger); the per-class table, confusion
    matrix, worst classes and prediction frequencies support model cards and drift baselines.
    """
    num_classes = len(label_names)
    p, y = _check(probs, labels, num_classes)
    n = int(y.size)
    if n == 0:
        raise ValueError("cannot summarize zero samples")

    pred = p.argmax(axis=1)
    correct = pred == y
    topk_idx, _ = top_k_from_probs(p, 5)
    top5 = np.mean(np.any(topk_idx == y[:, None], axis=1))

    cm = np.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
    cm = cm.reshape(num_classes, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    # A class never predicted (or never present) has precision (recall) 0, not NaN.
    precision = np.divide(tp, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(num_classes), where=support > 0)
    pr = precision + recall
    f1 = np.divide(2 * precision * recall, pr, out=np.zeros(num_classes), where=pr > 0)
    # Classes absent from both labels and predictions say nothing about this split: skip them.
    present = (support > 0) | (predicted > 0)
    macro_f1 = float(f1[present].mean())

    nll = float(-np.mean(np.log(np.clip(p[np.arange(n), y], _EPS, None))))
    ece = expected_calibration_error(p, y, n_bins)

    seen = [i for i in range(num_classes) if support[i] > 0]
    worst = sorted(seen, key=lambda i: (recall[i], label_names[i]))[:5]

    return {
        f"{prefix}/acc": _r(correct.mean()),
        f"{prefix}/top5": _r(top5),
        f"{prefix}/macro_f1": _r(macro_f1),
        f"{prefix}/ece": _r(ece),
        f"{prefix}/nll": _r(nll),
        f"{prefix}/loss": _r(nll),
        f"{prefix}/num_samples": n,
        "per_class": {
            name: {"precision": _r(precision[i]), "recall": _r(recall[i]), "f1": _r(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": cm.astype(int).tolist(),
        "worst_classes": [label_names[i] for i in worst],
        "predicted_class_frequencies": [_r(c / n) for c in predicted],
    }


def scalar_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Only the `prefix/...` numbers of a summary: what a metrics logger or Tune report wants."""
    return {k: float(v) for k, v in summary.items()
            if "/" in k and isinstance(v, int | float) and not isinstance(v, bool)}


class Accumulator:
    """Collects evaluation batches so a whole split can be summarised once at the end.

    Optionally keeps a uniform random sample of at most `keep_embeddings` embedding rows (for
    projector views / drift references) without holding every embedding in memory. Each row
    gets a uniform random key and the rows with the smallest keys are kept (reservoir sampling
    by random keys): the sample is uniform over all rows seen, deterministic for a seed, and does
    not depend on how the rows were split into batches.
    """

    def __init__(self, num_classes: int, keep_embeddings: int = 0, seed: int = 0) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if keep_embeddings < 0:
            raise ValueError(f"keep_embeddings must be >= 0, got {keep_embeddings}")
        self.num_classes = num_classes
        self.keep_embeddings = keep_embeddings
        self._rng = np.random.default_rng(seed)
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._seen = 0  # rows that came with embeddings, i.e. the population sampled from
        self._keys = np.empty(0)
        self._order = np.empty(0, dtype=np.int64)  # arrival index of each kept row
        self._emb: np.ndarray | None = None
        self._emb_preds = np.empty(0, dtype=np.int64)

    def update(self, logits_or_probs: np.ndarray, labels: np.ndarray, probs: bool = False,
               embeddings: np.ndarray | None = None) -> None:
        """Add one batch; logits are turned into probabilities unless `probs=True`."""
        p, y = _check(logits_or_probs, labels, self.num_classes)
        if not probs:
            p = softmax(p)
        self._probs.append(p)
        self._labels.append(y)
        if embeddings is not None and self.keep_embeddings > 0 and y.size:
            self._sample(np.asarray(embeddings), p.argmax(axis=1))

    def _sample(self, emb: np.ndarray, preds: np.ndarray) -> None:
        n = preds.shape[0]
        if emb.shape[0] != n:
            raise ValueError(f"embeddings have {emb.shape[0]} rows, the batch has {n}")
        emb = emb.reshape(n, -1)
        keys = self._rng.random(n)
        order = np.arange(self._seen, self._seen + n)
        self._seen += n
        if self._emb is None:
            all_emb = emb
        else:
            if self._emb.shape[1] != emb.shape[1]:
                raise ValueError(f"embedding width changed from {self._emb.shape[1]} to {emb.shape[1]}")
            all_emb = np.concatenate([self._emb, emb])
        all_keys = np.concatenate([self._keys, keys])
        all_order = np.concatenate([self._order, order])
        all_preds = np.concatenate([self._emb_preds, preds])
        keep = np.argsort(all_keys, kind="stable")[: self.keep_embeddings]
        keep = keep[np.argsort(all_order[keep])]  # present kept rows in arrival order
        self._emb = all_emb[keep].copy()
        self._keys = all_keys[keep]
        self._order = all_order[keep]
        self._emb_preds = all_preds[keep]

    @property
    def num_samples(self) -> int:
        return int(sum(y.size for y in self._labels))

    @property
    def embeddings(self) -> np.ndarray | None:
        """The kept embedding rows (k, D) in arrival order, or None if none were kept."""
        return self._emb

    @property
    def embedding_preds(self) -> np.ndarray | None:
        """The predicted class of each kept embedding row, or None if none were kept."""
        return None if self._emb is None else self._emb_preds

    def probs_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Everything collected so far, concatenated."""
        if not self._labels:
            return np.empty((0, self.num_classes)), np.empty(0, dtype=np.int64)
        return np.concatenate(self._probs), np.concatenate(self._labels)

    def result(self, labels_names: list[str], prefix: str = "test", n_bins: int = 15) -> dict[str, Any]:
        """`summarize` over every batch seen so far."""
        p, y = self.probs_and_labels()
        return summarize(p, y, labels_names, prefix=prefix, n_bins=n_bins)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless workers have no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def confusion_matrix_png(cm: list[list[int]] | np.ndarray, label_names: list[str],
                         title: str = "Confusion matrix", normalize: bool = True) -> bytes:
    """The confusion matrix as PNG bytes, for model cards and experiment trackers.

    Colours are row-normalised (recall per true class) so rare classes stay visible; tick labels
    are drawn for up to 40 classes, beyond which they would only overlap.
    """
    m = np.asarray(cm, dtype=np.float64)
    c = len(label_names)
    if m.shape != (c, c):
        raise ValueError(f"confusion matrix shape {m.shape} does not match {c} label names")
    rows = m.sum(axis=1, keepdims=True)
    shown = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) if normalize else m

    plt = _pyplot()
    side = float(min(16.0, max(4.0, 2.5 + 0.4 * c)))
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    if c <= _MAX_TICK_CLASSES:
        fontsize = 10 if c <= 15 else 7
        ax.set_xticks(range(c), labels=label_names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(c), labels=label_names, fontsize=fontsize)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if c <= _ANNOTATE_MAX_CLASSES:
        vmax = shown.max() if shown.size else 0.0
        for i in range(c):
            for j in range(c):
                text = f"{shown[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
                color = "white" if vmax > 0 and shown[i, j] > 0.5 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    return _png(plt, fig)


def reliability_png(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> bytes:
    """A reliability diagram as PNG bytes: per-bin accuracy against confidence, plus the diagonal.

    Bars below the diagonal mean over-confidence; the title carries the ECE being pictured.
    """
    counts, acc, mean_conf, ece = _calibration(probs, labels, n_bins, "a reliability diagram")
    width = 1.0 / n_bins
    centers = (np.arange(n_bins) + 0.5) * width
    filled = counts > 0

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.bar(centers[filled], acc[filled], width=width, edgecolor="black", color="tab:blue",
           alpha=0.8, label="accuracy")
    ax.bar(centers[filled], (mean_conf - acc)[filled], bottom=acc[filled], width=width,
           edgecolor="tab:red", color="tab:red", alpha=0.25, label="gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability diagram (ECE {ece:.4f}, n={int(counts.sum())})")
    ax.legend(loc="upper left")
    return _png(plt, fig)
