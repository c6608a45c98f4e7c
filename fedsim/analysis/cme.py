"""CME convergence analysis: covariance maps, ACF, saturation round, client characterisation.

Pure functions that take arrays (or a :class:`~fedsim.cme.CMEArchive`) and return arrays; the
display classes in :mod:`fedsim.analysis.figures` draw them. CME paper (Kumar et al., ICPR 2024),
section 3.1 (eqs. 3 and 4) and section 4.3 (how the figures are read). The paper only inspected
the figures; the numbers here (saturation round, ACF variation) make its two readings explicit:

* **saturation** (sec. 4.3, Fig. 4 a-i): "the covariance pattern stabilises" becomes: the
  similarity between consecutive rounds' covariance maps stays >= ``threshold`` for ``patience``
  consecutive rounds;
* **dominant vs still learning** (Fig. 4 j-l): "the ACF plot stays stable across rounds" becomes:
  the mean absolute round-to-round change of the normalised per-layer ACF is <= a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsim.cme.archive import CMEArchive
from fedsim.cme.schema import FIELD

#: Default similarity above which consecutive covariance maps count as "unchanged".
SIMILARITY_THRESHOLD = 0.9
#: Default number of consecutive similar rounds that define saturation.
SATURATION_PATIENCE = 2
#: Default ACF variation at or below which a client counts as dominant.
ACF_STABILITY_THRESHOLD = 0.1

DOMINANT = "dominant (stable ACF: needs little learning)"
LEARNING = "still learning (varying ACF)"


def covariance_map(cme: np.ndarray) -> np.ndarray:
    """Eq. 3: ``E[(C - mu_C)(C - mu_C)^T]`` of a CME matrix with rows as variables and columns as
    observations (the neurons' incoming connections): an ``R x R`` map for an ``R x K`` matrix.

    ``mu_C`` is each row's mean and the expectation is the unbiased sample estimate (divide by
    ``K - 1``), the same convention as ``numpy.cov``.
    """
    c = np.asarray(cme, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 2:
        raise ValueError(f"a covariance map needs a 2-D CME matrix with >= 2 columns, got shape {c.shape}")
    centred = c - c.mean(axis=1, keepdims=True)
    return centred @ centred.T / (c.shape[1] - 1)


def map_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two covariance maps over their upper triangles (diagonal included):
    1 = same pattern up to scale, ~0 = unrelated. Scale-free on purpose: CMEs shrink as training
    converges, but a stable *pattern* is what the paper reads as saturation."""
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    iu = np.triu_indices(a.shape[0])
    x, y = a[iu] - a[iu].mean(), b[iu] - b[iu].mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def consecutive_similarities(maps: Sequence[np.ndarray]) -> np.ndarray:
    """``s[j] = map_similarity(maps[j], maps[j + 1])``; length ``len(maps) - 1``."""
    return np.array([map_similarity(maps[j], maps[j + 1]) for j in range(len(maps) - 1)])


def saturation_round(
    maps: Sequence[np.ndarray],
    rounds: Sequence[int] | None = None,
    threshold: float = SIMILARITY_THRESHOLD,
    patience: int = SATURATION_PATIENCE,
) -> int | None:
    """The first round from which the covariance map stops changing, or ``None``.

    Round ``rounds[j]`` is the saturation round when the next ``patience`` maps are each at least
    ``threshold``-similar to their predecessor: ``s[j], ..., s[j + patience - 1] >= threshold``
    with ``s`` from :func:`consecutive_similarities`. So at least ``patience + 1`` rounds are needed.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    rounds = list(range(1, len(maps) + 1)) if rounds is None else list(rounds)
    if len(rounds) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(rounds)} round numbers")
    sims = consecutive_similarities(maps)
    for j in range(len(sims) - patience + 1):
        window = sims[j : j + patience]
        if np.all(np.isfinite(window)) and np.all(window >= threshold):
            return rounds[j]
    return None


@dataclass(frozen=True)
class ACF:
    """Per-layer ACF of one client: arrays of shape (rounds, layers).

    ``raw`` is eq. 4, ``E[C(i) C(i+1)]`` over consecutive local epochs of the round and over the
    elements valid in both; ``normalised`` divides the same sum by
    ``sqrt(sum C(i)^2 * sum C(i+1)^2)`` (a cosine similarity in [-1, 1], comparable across
    layers and architectures). NaN where a round has fewer than two local epochs.
    """

    rounds: np.ndarray
    layers: tuple[str, ...]
    raw: np.ndarray
    normalised: np.ndarray


def acf_from_stats(lag_count: np.ndarray, lag_sum: np.ndarray, sq_prev: np.ndarray, sq_cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 4 (and its normalised form) from the recorder's lag-1 terms, pooled over the last axis
    (the epoch pairs of a round). Inputs are (..., epochs); the first epoch's terms are zero."""
    n = lag_count.sum(axis=-1)
    s = lag_sum.sum(axis=-1)
    denom = np.sqrt(sq_prev.sum(axis=-1) * sq_cur.sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = np.where(n > 0, s / np.where(n > 0, n, 1), np.nan)
        norm = np.where((n > 0) & (denom > 0), s / np.where(denom > 0, denom, 1), np.nan)
    return raw, norm


def client_acf(archive: CMEArchive, client: int) -> ACF:
    """Per-layer, per-round ACF of one client from its archived statistics."""
    rounds = archive.rounds(client)
    layers = tuple(archive.layers(client))
    raw = np.full((len(rounds), len(layers)), np.nan)
    norm = np.full_like(raw, np.nan)
    for i, r in enumerate(rounds):
        rec = archive.read(client, r)
        st = np.stack([rec.stats[layer] for layer in layers])  # (layers, epochs, fields)
        raw[i], norm[i] = acf_from_stats(
            st[..., FIELD["lag_count"]], st[..., FIELD["lag_sum"]], st[..., FIELD["lag_sq_prev"]], st[..., FIELD["lag_sq_cur"]]
        )
    return ACF(np.array(rounds), layers, raw, norm)


def acf_variation(normalised: np.ndarray) -> float:
    """ACF stability number: the mean over layers and consecutive round pairs of
    ``|nACF_{r+1}(layer) - nACF_r(layer)|`` (0 = identical ACF plots every round; NaN entries
    skipped; NaN with fewer than two rounds)."""
    if normalised.shape[0] < 2:
        return float("nan")
    diff = np.abs(np.diff(normalised, axis=0))
    return float(np.nanmean(diff)) if np.isfinite(diff).any() else float("nan")


def characterise(variation: float, threshold: float = ACF_STABILITY_THRESHOLD) -> str:
    """The paper's reading of an ACF plot (sec. 4.3): stable -> dominant, varying -> still learning."""
    if not np.isfinite(variation):
        return "undetermined (needs >= 2 rounds with >= 2 local epochs)"
    return DOMINANT if variation <= threshold else LEARNING


def round_maps(archive: CMEArchive, client: int, layer: str, epoch: str = "last") -> tuple[np.ndarray, list[np.ndarray]]:
    """One covariance map per round of a client for ``layer``.

    ``epoch="last"`` (default) uses the CME of the round's last local epoch: the state the client
    sends to the server. ``epoch="mean"`` averages the maps of all local epochs of the round.
    """
    if epoch not in ("last", "mean"):
        raise ValueError(f"epoch must be 'last' or 'mean', got {epoch!r}")
    rounds = archive.rounds(client)
    maps = []
    for r in rounds:
        mats = archive.read(client, r).matrices.get(layer)
        if mats is None:
            raise KeyError(f"client {client} has no full CME matrix for layer {layer!r}; archived: {archive.matrix_layers(client)}")
        if epoch == "last":
            maps.append(covariance_map(mats[-1]))
        else:
            maps.append(np.mean([covariance_map(m) for m in mats], axis=0))
    return np.array(rounds), maps


@dataclass(frozen=True)
class ClientCMESummary:
    """What ``fedsim analyze`` reports per client."""

    client: int
    model: str
    layer: str
    rounds: list[int]
    similarities: list[float]  # between consecutive rounds' maps
    saturation_round: int | None
    acf_variation: float
    label: str
    mean_masked_fraction: float


def summarise_client(
    archive: CMEArchive,
    client: int,
    layer: str,
    similarity_threshold: float = SIMILARITY_THRESHOLD,
    patience: int = SATURATION_PATIENCE,
    acf_threshold: float = ACF_STABILITY_THRESHOLD,
) -> ClientCMESummary:
    rounds, maps = round_maps(archive, client, layer)
    acf = client_acf(archive, client)
    variation = acf_variation(acf.normalised)
    masked = np.nanmean([archive.read(client, int(r)).stat(layer, "masked_fraction").mean() for r in rounds])
    return ClientCMESummary(
        client=client,
        model=archive.model(client),
        layer=layer,
        rounds=[int(r) for r in rounds],
        similarities=[float(s) for s in consecutive_similarities(maps)],
        saturation_round=saturation_round(maps, list(rounds), similarity_threshold, patience),
        acf_variation=variation,
        label=characterise(variation, acf_threshold),
        mean_masked_fraction=float(masked),
    )
