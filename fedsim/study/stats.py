"""Pure numpy helpers of the validation study: AUROC and client-update geometry.

Nothing here imports torch or Flower, so the study's tables can be recomputed from its CSV/JSON
output alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

NAN_POLICIES = ("raise", "high", "low", "omit")


def auroc(scores_faulty: Iterable[float], scores_healthy: Iterable[float], nan: str = "raise") -> float:
    """Area under the ROC curve for telling faulty from healthy clients by a score: the
    probability that a faulty client scores *higher* than a healthy one, ties counting 1/2
    (the Mann-Whitney U statistic divided by ``n_faulty * n_healthy``).

    0.5 = no better than chance; 1 = every faulty client scores above every healthy one; 0 = every
    faulty client scores below (the statistic detects the fault in the other direction).
    ``+inf``/``-inf`` are ordinary (tied with each other) values. NaN: ``"raise"`` (default)
    refuses it; ``"high"`` / ``"low"`` rank it above / below every number (a non-finite client as
    the most extreme), tied with other NaNs; ``"omit"`` drops it. NaN if a group is empty.
    """
    if nan not in NAN_POLICIES:
        raise ValueError(f"nan must be one of {NAN_POLICIES}, got {nan!r}")
    f = _prepare(scores_faulty, nan)
    h = _prepare(scores_healthy, nan)
    if len(f) == 0 or len(h) == 0:
        return float("nan")
    greater = (f[:, None] > h[None, :]).sum()
    ties = (f[:, None] == h[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(f) * len(h)))


def _prepare(values: Iterable[float], nan: str) -> np.ndarray:
    x = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64).ravel()
    bad = np.isnan(x)
    if bad.any():
        if nan == "raise":
            raise ValueError(f"{int(bad.sum())} NaN score(s); choose nan='high', 'low' or 'omit'")
        if nan == "omit":
            return x[~bad]
        # +-inf stand for "beyond every number"; NaN is then tied with an infinite score
        x = np.where(bad, np.inf if nan == "high" else -np.inf, x)
    return x


def update_geometry(deltas: Mapping[int, np.ndarray]) -> dict[int, dict[str, float]]:
    """Per client of one round: ``norm`` (L2 of its update ``w_after - w_received``), ``cos_mean``
    (cosine to the mean update of all clients with finite updates, itself included) and
    ``cos_others`` (to the mean of the *other* finite updates), ``finite`` (1/0).

    A non-finite update has norm ``inf`` (NaN entries too) and NaN cosines, and is left out of the
    means, so one diverged client does not blank out the others' cosines.
    """
    finite = {k: bool(np.all(np.isfinite(d))) for k, d in deltas.items()}
    good = [k for k in deltas if finite[k]]
    total = np.sum([deltas[k] for k in good], axis=0) if good else None
    out: dict[int, dict[str, float]] = {}
    for k, d in deltas.items():
        row = {"finite": float(finite[k]), "norm": _norm(d) if finite[k] else float("inf")}
        row["cos_mean"] = _cos(d, total / len(good)) if finite[k] and total is not None else float("nan")
        others = len(good) - 1
        row["cos_others"] = _cos(d, (total - d) / others) if finite[k] and total is not None and others > 0 else float("nan")
        out[k] = row
    return out


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(a * a)))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    # element-wise sums, not BLAS: a multi-threaded BLAS dot spins for milliseconds on a busy machine
    na, nb = _norm(a), _norm(b)
    return float(np.sum(a * b) / (na * nb)) if na > 0 and nb > 0 else float("nan")


def summarise_rounds(values: Sequence[float]) -> dict[str, float]:
    """``mean`` over the finite values of a per-round series, ``first`` and ``last`` values."""
    x = np.asarray(values, dtype=np.float64)
    fin = x[np.isfinite(x)]
    return {
        "mean": float(fin.mean()) if len(fin) else (float(x[0]) if len(x) else float("nan")),
        "first": float(x[0]) if len(x) else float("nan"),
        "last": float(x[-1]) if len(x) else float("nan"),
    }


__all__ = ["NAN_POLICIES", "auroc", "summarise_rounds", "update_geometry"]
