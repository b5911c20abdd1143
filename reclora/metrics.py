"""CTR metrics: AUC, LogLoss, accuracy and GAUC (FuxiCTR's weighting: samples per user)."""

import numpy as np

EPS = 1e-7


def auc(labels, scores) -> float:
    """Area under the ROC curve by the rank-sum statistic, ties counted half. nan if one class is absent."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    positives = labels.sum()
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(labels.size, dtype=np.float64)
    # average rank over each run of equal scores: ties count half
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [labels.size]])
    mean_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def logloss(labels, probs) -> float:
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)))


def accuracy(labels, probs, threshold=0.5) -> float:
    return float(np.mean((np.asarray(probs) >= threshold) == (np.asarray(labels) >= 0.5)))


def gauc(users, labels, scores) -> float:
    """Mean per-user AUC weighted by the user's number of samples, over users with both classes."""
    users = np.asarray(users)
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    order = np.argsort(users, kind="mergesort")
    users, labels, scores = users[order], labels[order], scores[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], users.size]
    total = weight = 0.0
    for start, end in zip(starts, ends):
        user_auc = auc(labels[start:end], scores[start:end])
        if not np.isnan(user_auc):
            total += user_auc * (end - start)
            weight += end - start
    return total / weight if weight else float("nan")


def ctr_metrics(labels, probs, users=None) -> dict:
    """The metrics every evaluation reports; gauc is weighted by samples per user."""
    out = {"auc": auc(labels, probs), "logloss": logloss(labels, probs), "accuracy": accuracy(labels, probs)}
    if users is not None:
        out["gauc"] = gauc(users, labels, probs)
    return out


def format_metrics(metrics: dict) -> str:
    """FuxiCTR's line: [Metrics] logloss: 0.530000 - AUC: 0.780000 - ..."""
    names = {"logloss": "logloss", "auc": "AUC", "gauc": "gAUC", "accuracy": "accuracy"}
    parts = [f"{names[k]}: {metrics[k]:.6f}" for k in names if k in metrics]
    return "[Metrics] " + " - ".join(parts)
