"""Per-client update statistics, computed by the server from what it sent and what came back.

These are the non-CME baselines of the CME validation study (``docs/cme-validation.md``) and the
server's view of a client's health, recorded every round in ``metrics.jsonl``:

* ``update_norm``: ``||u_k||_2`` with ``u_k = w_k - w_sent``, over all shared floating-point arrays
  (a free-rider's is ~0, a diverging client's explodes);
* ``update_cosine``: cosine between ``u_k`` and the mean update of the *other* finite clients
  (``nan`` with a single client) - an honest client points roughly where the others point;
* ``update_finite``: whether every returned value is finite.

All in float64, so the statistics themselves cannot overflow where the update did not.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def update_stats(sent: Mapping[str, np.ndarray], returned: Mapping[int, Mapping[str, np.ndarray]]) -> dict[int, dict[str, float | bool]]:
    """``{client: {"update_norm", "update_cosine", "update_finite"}}`` for the returned arrays of
    each client (keyed by partition id) against the arrays ``sent`` to all of them."""
    keys = sorted(k for k, v in sent.items() if np.issubdtype(np.asarray(v).dtype, np.floating))
    base = np.concatenate([np.asarray(sent[k], np.float64).ravel() for k in keys]) if keys else np.zeros(0)
    updates = {c: np.concatenate([np.asarray(arrs[k], np.float64).ravel() for k in keys]) - base for c, arrs in returned.items()}
    finite = {c: bool(np.isfinite(u).all()) for c, u in updates.items()}
    out: dict[int, dict[str, float | bool]] = {}
    for c, u in updates.items():
        others = [updates[o] for o in updates if o != c and finite[o]]
        cosine = float("nan")
        if finite[c] and others:
            m = np.mean(others, axis=0)
            denom = float(np.linalg.norm(u) * np.linalg.norm(m))
            cosine = float(u @ m / denom) if denom > 0 else float("nan")
        norm = float(np.linalg.norm(u)) if finite[c] else float("inf")
        out[c] = {"update_norm": norm, "update_cosine": cosine, "update_finite": finite[c]}
    return out


__all__ = ["update_stats"]
