"""Evaluation metrics against values worked out by hand for small crafted cases."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from mlplatform.training.metrics import (
    Accumulator,
    confusion_matrix_png,
    expected_calibration_error,
    reliability_png,
    scalar_metrics,
    softmax,
    summarize,
    top_k_from_probs,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_hot_like(preds: list[int], num_classes: int, conf: float) -> np.ndarray:
    """Rows that put `conf` on the predicted class and spread the rest evenly."""
    rest = (1.0 - conf) / (num_classes - 1)
    p = np.full((len(preds), num_classes), rest)
    p[np.arange(len(preds)), preds] = conf
    return p


def crafted() -> tuple[np.ndarray, np.ndarray, list[str]]:
    # labels 0 0 0 1 1 2, predictions 0 1 1 1 2 2
    # confusion (true rows, predicted cols): [1 2 0], [0 1 1], [0 0 1]
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = one_hot_like([0, 1, 1, 1, 2, 2], 3, 0.6)  # others get 0.2 each
    return probs, labels, ["cat", "ant", "bee"]


def test_crafted_three_class_example():
    probs, labels, names = crafted()
    s = summarize(probs, labels, names, prefix="val")

    assert s["confusion_matrix"] == [[1, 2, 0], [0, 1, 1], [0, 0, 1]]
    assert s["val/acc"] == pytest.approx(3 / 6)
    assert s["val/num_samples"] == 6
    assert s["val/top5"] == 1.0  # C = 3 < 5: top-3 always contains the label

    # cat: tp 1, fp 0, fn 2 | ant: tp 1, fp 2, fn 1 | bee: tp 1, fp 1, fn 0
    expected = {
        "cat": (1.0, 1 / 3, 2 * 1.0 * (1 / 3) / (1.0 + 1 / 3), 3),  # f1 0.5
        "ant": (1 / 3, 1 / 2, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 2),  # f1 0.4
        "bee": (1 / 2, 1.0, 2 * (1 / 2) * 1.0 / (1 / 2 + 1.0), 1),  # f1 2/3
    }
    for name, (prec, rec, f1, support) in expected.items():
        row = s["per_class"][name]
        assert row["precision"] == pytest.approx(prec, abs=1e-6)
        assert row["recall"] == pytest.approx(rec, abs=1e-6)
        assert row["f1"] == pytest.approx(f1, abs=1e-6)
        assert row["support"] == support
    assert s["per_class"]["cat"]["f1"] == pytest.approx(0.5, abs=1e-6)
    assert s["per_class"]["ant"]["f1"] == pytest.approx(0.4, abs=1e-6)
    assert s["val/macro_f1"] == pytest.approx((0.5 + 0.4 + 2 / 3) / 3, abs=1e-6)

    # every confidence is 0.6, all in one bin: ECE = |0.5 - 0.6|
    assert s["val/ece"] == pytest.approx(0.1, abs=1e-6)
    # 3 rows give the true class 0.6, 3 rows give it 0.2
    nll = -(3 * math.log(0.6) + 3 * math.log(0.2)) / 6
    assert s["val/nll"] == pytest.approx(nll, abs=1e-6)
    assert s["val/loss"] == s["val/nll"]

    # recall: cat 1/3, ant 1/2, bee 1 (not alphabetical on purpose)
    assert s["worst_classes"] == ["cat", "ant", "bee"]
    assert s["predicted_class_frequencies"] == pytest.approx([1 / 6, 3 / 6, 2 / 6], abs=1e-6)
    assert sum(s["predicted_class_frequencies"]) == pytest.approx(1.0, abs=1e-5)


def test_summary_types_are_plain_and_json_serialisable():
    probs, labels, names = crafted()
    s = summarize(probs, labels, names)
    json.dumps(s)
    for key, value in s.items():
        if key.startswith("test/"):
            assert type(value) in (float, int)
            if isinstance(value, float):
                assert value == round(value, 6)
    assert all(type(v) is int for row in s["confusion_matrix"] for v in row)
    assert all(type(v) is float for v in s["predicted_class_frequencies"])
    assert type(s["per_class"]["cat"]["support"]) is int


def test_perfect_predictions():
    conf = [0.9, 0.7, 0.6, 0.8]
    labels = np.array([0, 1, 2, 1])
    probs = np.array([
        [0.9, 0.05, 0.05],
        [0.2, 0.7, 0.1],
        [0.3, 0.1, 0.6],
        [0.1, 0.8, 0.1],
    ])
    s = summarize(probs, labels, ["a", "b", "c"])
    assert s["test/acc"] == 1.0
    assert s["test/macro_f1"] == 1.0
    # accuracy is 1 in every bin, so ECE = sum_b n_b/N (1 - conf_b) = 1 - mean confidence
    assert s["test/ece"] == pytest.approx(1 - np.mean(conf), abs=1e-6)
    assert s["test/nll"] == pytest.approx(-np.mean(np.log(conf)), abs=1e-6)
    assert s["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]


def test_macro_f1_ignores_classes_absent_from_labels_and_predictions():
    probs = one_hot_like([0, 1], 3, 0.9)
    s = summarize(probs, np.array([0, 1]), ["a", "b", "c"])
    assert s["test/macro_f1"] == 1.0  # not 2/3: class c never appears
    assert s["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert s["worst_classes"] == ["a", "b"]  # no recall for a class never seen


def test_macro_f1_counts_a_predicted_but_absent_class_as_zero():
    # labels 0 0, predictions 0 1: class 1 is predicted but never true -> F1 0, still averaged
    probs = one_hot_like([0, 1], 3, 0.9)
    s = summarize(probs, np.array([0, 0]), ["a", "b", "c"])
    f1_a = 2 * 1.0 * 0.5 / 1.5
    assert s["test/macro_f1"] == pytest.approx((f1_a + 0.0) / 2, abs=1e-6)


def test_worst_classes_ties_by_name_and_capped_at_five():
    names = ["g", "f", "e", "d", "c", "b", "a"]
    labels = np.arange(7)
    probs = one_hot_like([1, 0, 3, 2, 5, 4, 6], 7, 0.5)  # all wrong except "a"
    s = summarize(probs, labels, names)
    assert s["worst_classes"] == ["b", "c", "d", "e", "f"]


def test_top5_with_more_than_five_classes():
    # class scores in descending order 0..5; the label's rank decides the top-5 hit
    row = np.array([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
    probs = np.tile(row, (4, 1))
    labels = np.array([0, 4, 5, 5])  # hits, hits, misses, misses
    s = summarize(probs, labels, list("abcdef"))
    assert s["test/top5"] == pytest.approx(0.5)
    assert s["test/acc"] == pytest.approx(0.25)


def test_top5_with_fewer_than_five_classes():
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.6, 0.4]])
    s = summarize(probs, np.array([0, 1, 1]), ["x", "y"])
    assert s["test/acc"] == 0.0
    assert s["test/top5"] == 1.0


def test_ece_constant_confidence():
    # all confidences 0.8, half correct -> |0.5 - 0.8| = 0.3
    probs = one_hot_like([0, 0, 1, 1], 2, 0.8)
    labels = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3)
    assert summarize(probs, labels, ["a", "b"])["test/ece"] == pytest.approx(0.3)


def test_ece_is_per_bin_not_global():
    # bin (0.9, 1.0]: conf 0.95, both right -> gap 0.05; bin (0.5, 0.6]: conf 0.55, both wrong
    # -> gap 0.55. ECE = 0.5 * 0.05 + 0.5 * 0.55 = 0.3 (the global |0.5 - 0.75| would be 0.25)
    probs = np.array([[0.95, 0.05], [0.05, 0.95], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.3)
    assert summarize(probs, labels, ["a", "b"], n_bins=10)["test/ece"] == pytest.approx(0.3)


def test_scalar_metrics_only_prefixed_numbers():
    probs, labels, names = crafted()
    s = summarize(probs, labels, names, prefix="val")
    scalars = scalar_metrics(s)
    assert set(scalars) == {"val/acc", "val/top5", "val/macro_f1", "val/ece", "val/nll",
                            "val/loss", "val/num_samples"}
    assert all(type(v) is float for v in scalars.values())
    assert scalars["val/num_samples"] == 6.0


def test_softmax_is_stable_and_normalised():
    logits = np.array([[1000.0, 1000.0, 0.0], [-1000.0, 0.0, 1000.0]])
    p = softmax(logits)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(softmax(np.array([[0.0, math.log(3.0)]])), [[0.25, 0.75]])


def test_logits_path_equals_probs_path():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(50, 4)) * 3
    labels = rng.integers(0, 4, size=50)
    exp = np.exp(logits)
    probs = exp / exp.sum(axis=1, keepdims=True)

    from_logits = Accumulator(4)
    from_logits.update(logits, labels)
    from_probs = Accumulator(4)
    from_probs.update(probs, labels, probs=True)
    names = list("abcd")
    assert from_logits.result(names) == from_probs.result(names)
    assert from_logits.result(names) == summarize(probs, labels, names)


def test_accumulator_over_batches_equals_concatenation():
    rng = np.random.default_rng(7)
    logits = [rng.normal(size=(n, 5)) for n in (7, 1, 12, 30)]
    labels = [rng.integers(0, 5, size=len(x)) for x in logits]
    acc = Accumulator(5)
    for x, y in zip(logits, labels, strict=True):
        acc.update(x, y)
    names = ["v", "w", "x", "y", "z"]
    expected = summarize(softmax(np.concatenate(logits)), np.concatenate(labels), names)
    assert acc.result(names) == expected
    assert acc.num_samples == 50
    assert acc.embeddings is None and acc.embedding_preds is None


def test_accumulator_rejects_mismatched_shapes():
    acc = Accumulator(3)
    with pytest.raises(ValueError):
        acc.update(np.zeros((4, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError):
        acc.update(np.zeros((4, 3)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError):
        acc.update(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError):
        acc.result(["a", "b", "c"])  # nothing collected


def feed(acc: Accumulator, sizes: list[int], num_classes: int = 3, dim: int = 2) -> np.ndarray:
    """Batches whose embedding rows carry their global row id in column 0."""
    rng = np.random.default_rng(123)
    total = sum(sizes)
    logits = rng.normal(size=(total, num_classes))
    labels = rng.integers(0, num_classes, size=total)
    emb = np.stack([np.arange(total, dtype=float)] + [rng.normal(size=total)] * (dim - 1), axis=1)
    start = 0
    for n in sizes:
        sl = slice(start, start + n)
        acc.update(logits[sl], labels[sl], embeddings=emb[sl])
        start += n
    return logits


def test_reservoir_keeps_cap_and_is_deterministic():
    a = Accumulator(3, keep_embeddings=5, seed=11)
    logits = feed(a, [4, 9, 7])
    b = Accumulator(3, keep_embeddings=5, seed=11)
    feed(b, [4, 9, 7])
    assert a.embeddings.shape == (5, 2)
    assert a.embedding_preds.shape == (5,)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.embedding_preds, b.embedding_preds)

    ids = a.embeddings[:, 0].astype(int)
    assert len(set(ids)) == 5 and ids.min() >= 0 and ids.max() < 20
    np.testing.assert_array_equal(a.embedding_preds, logits[ids].argmax(axis=1))

    # independent of how rows were batched
    c = Accumulator(3, keep_embeddings=5, seed=11)
    feed(c, [20])
    np.testing.assert_array_equal(a.embeddings, c.embeddings)

    others = set()
    for seed in range(12, 20):
        d = Accumulator(3, keep_embeddings=5, seed=seed)
        feed(d, [4, 9, 7])
        others.add(tuple(d.embeddings[:, 0].astype(int)))
    assert any(o != tuple(ids) for o in others)  # the seed matters


def test_reservoir_keeps_everything_below_cap():
    a = Accumulator(3, keep_embeddings=50, seed=0)
    feed(a, [3, 4])
    np.testing.assert_array_equal(a.embeddings[:, 0], np.arange(7))
    off = Accumulator(3, keep_embeddings=0)
    feed(off, [3, 4])
    assert off.embeddings is None


def test_reservoir_sample_is_uniform():
    n_rows, cap, trials = 20, 5, 2000
    hits = np.zeros(n_rows)
    for seed in range(trials):
        acc = Accumulator(3, keep_embeddings=cap, seed=seed)
        feed(acc, [2, 8, 10])
        hits[acc.embeddings[:, 0].astype(int)] += 1
    expected = trials * cap / n_rows  # 500; binomial sd ~19
    assert np.all(np.abs(hits - expected) < 100), hits


def test_top_k_from_probs_sorted_descending():
    probs = np.array([[0.1, 0.5, 0.2, 0.2], [0.4, 0.3, 0.2, 0.1]])
    idx, scores = top_k_from_probs(probs, 3)
    np.testing.assert_array_equal(idx, [[1, 2, 3], [0, 1, 2]])  # tie 2/3 by class index
    np.testing.assert_allclose(scores, [[0.5, 0.2, 0.2], [0.4, 0.3, 0.2]])
    assert np.all(np.diff(scores, axis=1) <= 0)

    rng = np.random.default_rng(0)
    p = softmax(rng.normal(size=(30, 8)))
    idx, scores = top_k_from_probs(p, 5)
    assert idx.shape == scores.shape == (30, 5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_array_equal(idx[:, 0], p.argmax(axis=1))
    np.testing.assert_allclose(scores, np.sort(p, axis=1)[:, ::-1][:, :5])

    idx, scores = top_k_from_probs(probs, 10)  # k clipped to C
    assert idx.shape == (2, 4)
    with pytest.raises(ValueError):
        top_k_from_probs(probs, 0)


def test_confusion_matrix_png():
    probs, labels, names = crafted()
    cm = summarize(probs, labels, names)["confusion_matrix"]
    small = confusion_matrix_png(cm, names)
    assert small.startswith(PNG_SIGNATURE)
    assert confusion_matrix_png(np.array(cm), names, normalize=False).startswith(PNG_SIGNATURE)

    many = [f"class_{i}" for i in range(60)]
    rng = np.random.default_rng(0)
    big = confusion_matrix_png(rng.integers(0, 9, size=(60, 60)), many, title="60 classes")
    assert big.startswith(PNG_SIGNATURE)
    w_small = Image.open(io.BytesIO(small)).size[0]
    w_big = Image.open(io.BytesIO(big)).size[0]
    assert w_small < w_big <= 18 * 100  # scales with class count, capped near 16 in at 100 dpi

    with pytest.raises(ValueError):
        confusion_matrix_png(cm, names[:2])


def test_reliability_png():
    probs, labels, _ = crafted()
    png = reliability_png(probs, labels, n_bins=10)
    assert png.startswith(PNG_SIGNATURE)
    assert Image.open(io.BytesIO(png)).size[0] > 100
