"""Top-k classification error, in percent, as the paper reports it (§4: "top-1 and top-5 error").

Ties are broken deterministically: classes are ranked by descending probability and, among equal
probabilities, by ascending class index (what a stable sort does). So a sample whose true class ties with
others for the k-th place counts as correct only if the true class has the lower index. This matters for
degenerate posteriors (e.g. an untrained model that outputs uniform probabilities: top-1 is then correct
only for class 0) and makes the error independent of the sorting algorithm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vgg.errors import DataError

if TYPE_CHECKING:
    from vgg.evaluate.results import Posteriors


def top_k_error(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percentage of samples whose true class is not among the k highest-probability classes.

    `probs` [N, C] (any real scores; only their order matters), `labels` [N] int class indices.
    """
    correct = top_k_correct(probs, labels, k)
    return float(100.0 * np.count_nonzero(~correct) / correct.size)


def top_k_correct(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per sample (bool [N]): is the true class among the k highest-probability classes (ties as above)."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise DataError(f"top-k error: expected probs [N, C] and labels [N], got {probs.shape} and {labels.shape}")
    count, classes = probs.shape
    if count == 0:
        raise DataError("top-k error: no samples to score")
    if not 1 <= k <= classes:
        raise DataError(f"top-k error: k must be in [1, {classes}] (the number of classes), got {k}")
    if labels.min() < 0 or labels.max() >= classes:
        raise DataError(f"top-k error: labels must be in [0, {classes}), got range [{labels.min()}, {labels.max()}]")
    rows = np.arange(count)
    true = probs[rows, labels][:, None]
    index = np.arange(classes)[None, :]
    # Rank of the true class (0 = first) under the tie rule above; correct when rank < k.
    ahead = (probs > true) | ((probs == true) & (index < labels[:, None]))
    return ahead.sum(axis=1) < k


def top_k(posteriors: Posteriors) -> tuple[int, int]:
    """The k of the paper's two errors: 1 and 5 (with fewer than 5 classes, top-5 is over all classes)."""
    return 1, min(5, posteriors.probs.shape[1])


def errors(posteriors: Posteriors) -> dict[str, float]:
    """The paper's two numbers for one set of posteriors: `top1_err` and `top5_err`, in percent.

    With fewer than 5 classes top-5 is trivially 0 and is reported over all classes (k = C).
    """
    one, five = top_k(posteriors)
    return {
        "top1_err": top_k_error(posteriors.probs, posteriors.labels, one),
        "top5_err": top_k_error(posteriors.probs, posteriors.labels, five),
    }
