"""Binary classification metrics (numpy only): ROC AUC and confusion-matrix metrics.

Used by the ``aicnet3d`` task (glaucoma = positive class) during training and evaluation.
"""

from __future__ import annotations

import math

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties count 1/2
    (the Mann-Whitney U statistic, via average ranks). NaN if one class is missing."""
    # Not MONAI's compute_roc_auc (equal to this bit for bit on 2,000 random tie-heavy cases): it needs torch tensors, this layer is numpy-only.
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over tied groups
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def binary_metrics(labels: np.ndarray, scores: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, F1 (glaucoma = positive), ROC AUC from ``scores`` and
    balanced accuracy (the authors' "AUROC" on rounded predictions)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    tp = int(((preds == 1) & (labels == 1)).sum())
    tn = int(((preds == 0) & (labels == 0)).sum())
    fp = int(((preds == 1) & (labels == 0)).sum())
    fn = int(((preds == 0) & (labels == 1)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    sens, spec = ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {
        "accuracy": ratio(tp + tn, len(labels)),
        "sensitivity": sens,
        "specificity": spec,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "auc": roc_auc(labels, scores),
        "balanced-accuracy": (sens + spec) / 2,
    }


__all__ = ["binary_metrics", "roc_auc"]
