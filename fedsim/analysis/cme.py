"""CME convergence analysis: covariance maps, ACF, per-round statistics with null bands, verdicts.

Pure functions that take arrays (or a :class:`~fedsim.cme.CMEArchive`) and return arrays; the
display classes in :mod:`fedsim.analysis.figures` draw them. CME paper (Kumar et al., ICPR 2024),
section 3.1 (eqs. 3 and 4), sec. 3.2 and sec. 4.3 (how the figures are read). The paper only
inspected the figures; this module turns its readings into statistics, and compares every statistic
a verdict uses with a **null reference computed on the same run**:

* **map similarity** of consecutive rounds' covariance maps, *off the diagonal* (the diagonal, the
  neurons' variances, is positive and heavy-tailed and dominates a correlation that includes it:
  pure noise maps score ~0.66 with it). Null: the similarity of a map to a version of the next map
  whose neurons are shuffled (the same permutation of rows and columns, K seeded permutations):
  what two unrelated maps with the same values score. Used for the saturation round.
* **ACF variation** (the paper's "stable vs varying ACF plots", Fig. 4 j-l): the mean absolute
  round-to-round change of the normalised per-layer ACF, over the *head* layers (the layers all
  clients share; over all layers it mostly counts how many layers a model has) and, for reference,
  over all layers. Null: the change that sampling noise alone would produce if the ACF did not
  change at all, from a jackknife over element groups of each round's ACF.
* **CME magnitude** of the head (mean ``|C|``, dead units counting as 0 change), compared with the
  other clients of the run (the null of exchangeable clients).
* **dead-unit, masked and non-finite fractions** (see :mod:`fedsim.cme.schema`).

:func:`decide_verdict` turns them into one verdict per client from a fixed vocabulary
(:data:`VERDICTS`); the rule is in that one function so a validation study can swap statistics.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from fedsim.analysis.agreement import RankTest, label_tests, outlier_on_average, rank_sum_test, update_tests
from fedsim.cme.archive import CMEArchive, RoundCME
from fedsim.cme.schema import FIELD, LAG_GROUP_FIELDS

#: Optional absolute floor for the consecutive-map similarity of a saturated client, on top of the
#: calibrated references (permutation null and noise ceiling); -1 (default): no extra floor. The
#: earlier constant 0.9 was never reached, not even with the learning rate at ~0.
SIMILARITY_THRESHOLD = -1.0
#: Default number of bootstrap pairs behind the noise ceiling of the map similarity.
CEILING_SAMPLES = 50
#: Default number of consecutive similar rounds that define saturation.
SATURATION_PATIENCE = 2
#: Default number of permutations / noise draws behind a null band.
NULL_SAMPLES = 200
#: Default central coverage of a null band: 0.9 = the 5 % to 95 % quantiles.
NULL_COVERAGE = 0.9
#: Name patterns of the head layers (shared by every client of a run).
HEAD_PATTERNS: tuple[str, ...] = ("head.*",)
#: A round with more than this fraction of head weights moving by more than their own size in one
#: local epoch (median ``|C|`` > 1) is *exploding*. Healthy runs stay below ~1 %.
EXPLODING_JUMP_FRACTION = 0.5
#: With the server's update norms, the relative ``diverged`` rule (:func:`exploding_round`) also
#: needs the client's update to be at least this many times the largest same-model peer's: an
#: explosion is an order of magnitude, not a client that moved somewhat more than two peers. In
#: the validation study's seeds 0-29, diverging clients' updates were 9e3-5e10x their peers',
#: while the healthy and label-noise clients the rule had called diverged were 1.04-1.65x
#: (docs/cme-validation.md; ``benchmarks/cme_cme_rules.py --report exploding``).
EXPLODING_UPDATE_RATIO = 10.0
#: The per-round ``metrics.jsonl`` statistic of the label-agreement ``weak`` test
#: (:mod:`fedsim.analysis.agreement`; chosen by the validation study, docs/cme-validation.md).
LABEL_STATISTIC = "train_loss"
#: The label test's round weighting (:data:`fedsim.analysis.agreement.WEIGHTINGS`): ``quadratic``,
#: because labels can only disagree with a model that has learned something; the first rounds,
#: with every client near chance, carry no evidence. In the validation study's seeds 50-69 the
#: label-noise client was the highest only from round 4-5 in the runs the ``linear`` rule (its
#: rule before) missed; ``quadratic`` gives rounds 1-4 of 8 rounds 15 % of the weight instead of
#: 28 % (docs/cme-validation.md; ``benchmarks/cme_label_rules.py``).
LABEL_WEIGHTING = "quadratic"
#: A verdict other than ``diverged`` needs this many rounds with this many local epochs.
MIN_ROUNDS = 3
MIN_EPOCHS = 2
#: Other clients *of the same model* that a client's contribution is judged against (``weak`` and the
#: relative ``diverged`` rule). Two, because the null of those tests is the gap between the other
#: clients themselves; across architectures head magnitudes, jump fractions and training losses
#: differ systematically, so they are never compared (docs/cme-validation.md).
MIN_SAME_MODEL_PEERS = 2

WEAK, DOMINANT, LEARNING, DIVERGED, UNDETERMINED = "weak", "dominant", "learning", "diverged", "undetermined"
#: The fixed verdict vocabulary of ``fedsim analyze``.
VERDICTS: tuple[str, ...] = (WEAK, DOMINANT, LEARNING, DIVERGED, UNDETERMINED)


# ---------------------------------------------------------------------------- covariance maps
def covariance_map(cme: np.ndarray) -> np.ndarray:
    """Eq. 3: ``E[(C - mu_C)(C - mu_C)^T]`` of a CME matrix with rows as variables and columns as
    observations (the neurons' incoming connections): an ``R x R`` map for an ``R x K`` matrix.

    Estimator: **pairwise-complete** unbiased covariance. NaN entries of ``C`` (masked, dead or
    non-finite elements, see :mod:`fedsim.cme.schema`) are left out: entry ``(a, b)`` is
    ``numpy.cov`` of rows ``a`` and ``b`` restricted to the columns valid in both (each row's mean
    taken over those columns, divided by ``n_ab - 1``); NaN where fewer than two columns are valid
    in both, so a dead unit's row and column of the map are NaN. Without NaN this is exactly
    ``numpy.cov(C)``. (Pairwise maps need not be positive semi-definite; they are read entry by
    entry, not inverted.)
    """
    c = np.asarray(cme, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 2:
        raise ValueError(f"a covariance map needs a 2-D CME matrix with >= 2 columns, got shape {c.shape}")
    valid = np.isfinite(c)
    m = valid.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        # shift each row by its own mean (covariance is shift-invariant; this keeps the sums small)
        row_mean = np.where(valid, c, 0.0).sum(axis=1) / np.maximum(m.sum(axis=1), 1)
        x = np.where(valid, c - row_mean[:, None], 0.0)
        n = m @ m.T  # columns valid in both rows
        s_ab = x @ x.T
        s_a = x @ m.T  # sum of row a over the columns valid in both
        s_b = m @ x.T
        cov = (s_ab - s_a * s_b / n) / (n - 1)
    return np.where(n >= 2, cov, np.nan)


def correlation_map(cov: np.ndarray) -> np.ndarray:
    """``cov[a, b] / sqrt(cov[a, a] * cov[b, b])``: the covariance map on a common [-1, 1] scale."""
    cov = np.asarray(cov, dtype=np.float64)
    d = np.sqrt(np.where(np.diag(cov) > 0, np.diag(cov), np.nan))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.outer(d, d)


def map_similarity(a: np.ndarray, b: np.ndarray, diagonal: bool = False) -> float:
    """Pearson correlation of two maps over their strict upper triangles (``diagonal=True``: the
    upper triangle with the diagonal, fedsim's statistic before issue 10), over entries finite in both:
    1 = same pattern up to scale, ~0 = unrelated. Scale-free on purpose: CMEs shrink as training
    converges, but a stable *pattern* is what the paper reads as saturation."""
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    iu = np.triu_indices(a.shape[0], k=0 if diagonal else 1)
    return _pearson(np.asarray(a)[iu], np.asarray(b)[iu])


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def consecutive_similarities(maps: Sequence[np.ndarray], diagonal: bool = False) -> np.ndarray:
    """``s[j] = map_similarity(maps[j], maps[j + 1])``; length ``len(maps) - 1``."""
    return np.array([map_similarity(maps[j], maps[j + 1], diagonal) for j in range(len(maps) - 1)])


def similarity_null(a: np.ndarray, b: np.ndarray, samples: int = NULL_SAMPLES, seed: int = 0) -> np.ndarray:
    """Permutation null of :func:`map_similarity` (off the diagonal): the similarity of ``a`` to
    ``b`` with its neurons shuffled (``b[p][:, p]`` for ``samples`` seeded permutations ``p``).
    The values stay those of ``b``; only which neuron pairs they belong to is random."""
    rng = np.random.default_rng(seed)
    iu = np.triu_indices(a.shape[0], k=1)
    x = np.asarray(a)[iu]
    out = np.empty(samples)
    for k in range(samples):
        p = rng.permutation(a.shape[0])
        out[k] = _pearson(x, np.asarray(b)[np.ix_(p, p)][iu])
    return out


def band(values: np.ndarray, coverage: float = NULL_COVERAGE) -> tuple[float, float]:
    """The central ``coverage`` interval of ``values`` (NaN ignored; NaN, NaN if none is finite)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [(1 - coverage) / 2, (1 + coverage) / 2])
    return float(lo), float(hi)


def similarity_bands(maps: Sequence[np.ndarray], samples: int = NULL_SAMPLES, coverage: float = NULL_COVERAGE, seed: int = 0) -> np.ndarray:
    """``(len(maps) - 1, 2)``: the null band of each consecutive similarity (:func:`similarity_null`),
    each pair with its own seed derived from ``seed``."""
    out = np.full((max(len(maps) - 1, 0), 2), np.nan)
    for j in range(len(maps) - 1):
        out[j] = band(similarity_null(maps[j], maps[j + 1], samples, seed=seed * 1_000_003 + j), coverage)
    return out


def similarity_ceiling(cme: np.ndarray, samples: int = CEILING_SAMPLES, seed: int = 0) -> np.ndarray:
    """Noise ceiling of :func:`map_similarity`: ``samples`` similarities of two covariance maps
    each estimated from an independent bootstrap resample of the *columns* (incoming connections)
    of the same CME matrix ``cme`` (``R x K``).

    Two maps estimated from the same matrix differ only by estimation noise, so this is how similar
    consecutive maps can be expected to be if the client's CME structure did not change at all: the
    reference for "unchanged" that a fixed threshold lacked. (Disjoint column halves were tried and
    do not work: the maps' off-diagonal structure is carried by a few heavy-tailed columns;
    docs/cme-validation.md.)
    """
    c = np.asarray(cme, dtype=np.float64)
    rng = np.random.default_rng(seed)
    k = c.shape[1]
    out = np.empty(samples)
    for i in range(samples):
        out[i] = map_similarity(covariance_map(c[:, rng.integers(0, k, k)]), covariance_map(c[:, rng.integers(0, k, k)]))
    return out


def ceiling_bands(cmes: Sequence[np.ndarray], samples: int = CEILING_SAMPLES, coverage: float = NULL_COVERAGE, seed: int = 0) -> np.ndarray:
    """``(len(cmes) - 1, 2)``: for each consecutive pair of CME matrices, the central ``coverage``
    band of :func:`similarity_ceiling`, half of the draws from each matrix of the pair."""
    out = np.full((max(len(cmes) - 1, 0), 2), np.nan)
    draws = [similarity_ceiling(c, max(samples // 2, 1), seed=seed * 1_000_003 + j) for j, c in enumerate(cmes)]
    for j in range(len(cmes) - 1):
        out[j] = band(np.concatenate([draws[j], draws[j + 1]]), coverage)
    return out


def saturation_round(
    maps: Sequence[np.ndarray],
    rounds: Sequence[int] | None = None,
    threshold: float = SIMILARITY_THRESHOLD,
    patience: int = SATURATION_PATIENCE,
    null_upper: Sequence[float] | np.ndarray | None = None,
    diagonal: bool = False,
    ceiling_lower: Sequence[float] | np.ndarray | None = None,
) -> int | None:
    """The first round from which the covariance map stops changing, or ``None``.

    Round ``rounds[j]`` is the saturation round when the next ``patience`` maps are each similar to
    their predecessor: ``s[j], ..., s[j + patience - 1] >= threshold`` with ``s`` from
    :func:`consecutive_similarities`, and, for the references given (one value per consecutive
    pair), above the permutation null (``null_upper``: the upper edges of :func:`similarity_bands`:
    the maps share structure) and at least at the noise ceiling (``ceiling_lower``: the lower edges
    of :func:`ceiling_bands`: the maps are as similar as two noisy estimates of one map). So at
    least ``patience + 1`` rounds are needed.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    rounds = list(range(1, len(maps) + 1)) if rounds is None else list(rounds)
    if len(rounds) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(rounds)} round numbers")
    sims = consecutive_similarities(maps, diagonal)
    floor = np.full(len(sims), threshold)
    for ref in (null_upper, ceiling_lower):
        if ref is not None:
            floor = np.fmax(floor, np.asarray(ref, dtype=np.float64))
    for j in range(len(sims) - patience + 1):
        window, lim = sims[j : j + patience], floor[j : j + patience]
        if np.all(np.isfinite(window)) and np.all(window >= lim):
            return int(rounds[j])
    return None


# ---------------------------------------------------------------------------- ACF
@dataclass(frozen=True)
class ACF:
    """Per-layer ACF of one client: arrays of shape (rounds, layers).

    ``raw`` is eq. 4, ``E[C(i) C(i+1)]`` over consecutive local epochs of the round and over the
    elements valid in both; ``normalised`` divides the same sum by
    ``sqrt(sum C(i)^2 * sum C(i+1)^2)`` (a cosine similarity in [-1, 1], comparable across
    layers and architectures); ``se`` is the jackknife standard error of ``normalised`` over the
    recorder's element groups (:func:`acf_jackknife_se`). NaN where a round has fewer than two
    local epochs.
    """

    rounds: np.ndarray
    layers: tuple[str, ...]
    raw: np.ndarray
    normalised: np.ndarray
    se: np.ndarray | None = None


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


def acf_jackknife_se(groups: np.ndarray) -> np.ndarray:
    """Jackknife standard error of the normalised ACF from per-group lag terms.

    ``groups`` is ``(..., G, 4)`` with the :data:`~fedsim.cme.schema.LAG_GROUP_FIELDS` (count, sum,
    sq_prev, sq_cur), already pooled over a round's epoch pairs. With ``g`` running over the ``G'``
    non-empty groups, ``theta_(-g)`` is the normalised ACF without group ``g`` and
    ``se^2 = (G' - 1) / G' * sum (theta_(-g) - mean)^2``. NaN with fewer than two non-empty groups.
    """
    g = np.asarray(groups, dtype=np.float64)
    count, s, a, b = (g[..., i] for i in range(len(LAG_GROUP_FIELDS)))
    with np.errstate(invalid="ignore", divide="ignore"):
        loo = (s.sum(-1, keepdims=True) - s) / np.sqrt((a.sum(-1, keepdims=True) - a) * (b.sum(-1, keepdims=True) - b))
    use = (count > 0) & np.isfinite(loo)
    k = use.sum(axis=-1)
    mean = np.where(use, loo, 0.0).sum(axis=-1) / np.maximum(k, 1)
    dev = np.where(use, (loo - mean[..., None]) ** 2, 0.0).sum(axis=-1)
    se = np.sqrt((k - 1) / np.maximum(k, 1) * dev)
    return np.where(k >= 2, se, np.nan)


def client_acf(archive: CMEArchive, client: int) -> ACF:
    """Per-layer, per-round ACF (and its jackknife standard error) of one client."""
    rounds = archive.rounds(client)
    layers = tuple(archive.layers(client))
    raw = np.full((len(rounds), len(layers)), np.nan)
    norm = np.full_like(raw, np.nan)
    se = np.full_like(raw, np.nan)
    for i, r in enumerate(rounds):
        rec = archive.read(client, r)
        st = np.stack([rec.stats[layer] for layer in layers])  # (layers, epochs, fields)
        raw[i], norm[i] = acf_from_stats(
            st[..., FIELD["lag_count"]], st[..., FIELD["lag_sum"]], st[..., FIELD["lag_sq_prev"]], st[..., FIELD["lag_sq_cur"]]
        )
        if all(layer in rec.lag_groups for layer in layers):
            pooled = np.stack([rec.lag_groups[layer].sum(axis=0) for layer in layers])  # (layers, G, 4)
            se[i] = np.where(np.isfinite(norm[i]), acf_jackknife_se(pooled), np.nan)
    return ACF(np.array(rounds), layers, raw, norm, se)


def acf_changes(normalised: np.ndarray, columns: Sequence[int] | None = None) -> np.ndarray:
    """``(rounds - 1,)``: per consecutive round pair, the mean over the selected layers (default:
    all) of ``|nACF_{r+1} - nACF_r|``; NaN entries skipped (NaN if none is finite)."""
    x = np.asarray(normalised, dtype=np.float64)
    if columns is not None:
        x = x[:, list(columns)]
    diff = np.abs(np.diff(x, axis=0))
    out = np.full(diff.shape[0], np.nan)
    for j, row in enumerate(diff):
        if np.isfinite(row).any():
            out[j] = float(np.nanmean(row))
    return out


def acf_variation(normalised: np.ndarray, columns: Sequence[int] | None = None) -> float:
    """ACF stability number: the mean over the selected layers (default: all) and consecutive round
    pairs of ``|nACF_{r+1}(layer) - nACF_r(layer)|`` (0 = identical ACF plots every round; NaN
    entries skipped; NaN with fewer than two rounds)."""
    x = np.asarray(normalised, dtype=np.float64)
    if columns is not None:
        x = x[:, list(columns)]
    if x.shape[0] < 2:
        return float("nan")
    diff = np.abs(np.diff(x, axis=0))
    return float(np.nanmean(diff)) if np.isfinite(diff).any() else float("nan")


def acf_change_null(
    normalised: np.ndarray,
    se: np.ndarray,
    columns: Sequence[int] | None = None,
    samples: int = NULL_SAMPLES,
    coverage: float = NULL_COVERAGE,
    seed: int = 0,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Noise bands of :func:`acf_changes` and :func:`acf_variation` if the ACF did not change.

    Under the null every layer's true normalised ACF is the same in consecutive rounds, so the
    observed change is sampling noise: ``N(0, se_r^2 + se_{r+1}^2)`` with ``se`` from
    :func:`acf_jackknife_se`. ``samples`` seeded draws of all changes (over the layer/round pairs
    where both ACFs are finite) give the distribution of the per-pair mean and of the overall mean
    of ``|change|``; returned are the per-pair bands ``(rounds - 1, 2)`` and the variation's band.
    """
    x, s = np.asarray(normalised, dtype=np.float64), np.asarray(se, dtype=np.float64)
    if columns is not None:
        x, s = x[:, list(columns)], s[:, list(columns)]
    pairs = max(x.shape[0] - 1, 0)
    per_pair = np.full((pairs, 2), np.nan)
    if pairs == 0:
        return per_pair, (float("nan"), float("nan"))
    ok = np.isfinite(np.diff(x, axis=0))  # the pairs acf_changes averages over
    sd = np.sqrt(s[:-1] ** 2 + s[1:] ** 2)
    if not np.all(np.isfinite(sd[ok])) or not ok.any():
        return per_pair, (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = np.abs(rng.standard_normal((samples, *sd.shape)) * np.where(ok, sd, 0.0))  # (samples, pairs, layers)
    for j in range(pairs):
        if ok[j].any():
            per_pair[j] = band(draws[:, j, ok[j]].mean(axis=1), coverage)
    overall = band(draws[:, ok].mean(axis=1), coverage)
    return per_pair, overall


def head_layers(layers: Sequence[str], patterns: Sequence[str] = HEAD_PATTERNS, fallback: Sequence[str] = ()) -> list[str]:
    """The layers matching ``patterns`` (default ``head.*``), in ``layers`` order; if none does,
    those of ``fallback`` (e.g. the analysis layers) that are in ``layers``."""
    found = [n for n in layers if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return found or [n for n in layers if n in set(fallback)]


def round_maps(archive: CMEArchive, client: int, layer: str, epoch: str = "last") -> tuple[np.ndarray, list[np.ndarray]]:
    """One covariance map per round of a client for ``layer``.

    ``epoch="last"`` (default) uses the CME of the round's last local epoch: the state the client
    sends to the server. ``epoch="mean"`` averages the maps of all local epochs of the round
    (entry by entry, over the epochs where it is defined).
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
            stack = np.stack([covariance_map(m) for m in mats])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN entries stay NaN
                maps.append(np.nanmean(stack, axis=0))
    return np.array(rounds), maps


# ---------------------------------------------------------------------------- per-round statistics
@dataclass(frozen=True)
class ClientStatistics:
    """Everything a verdict may use, for one client: per-round arrays (index ``j`` = ``rounds[j]``;
    statistics of consecutive rounds are NaN at ``j = 0``) and their null bands ``(rounds, 2)``.

    Head statistics pool the head layers (:func:`head_layers`) and the round's local epochs; map
    statistics use the analysis ``layer`` (last local epoch of each round).
    """

    client: int
    model: str
    layer: str
    head: tuple[str, ...]
    rounds: np.ndarray
    epochs: np.ndarray
    #: largest non-finite fraction over all layers and epochs, and the layer it is in
    nonfinite_fraction: np.ndarray
    nonfinite_layer: tuple[str, ...]
    #: head: fraction of valid elements with |C| > 1 (largest over the round's epochs)
    jump_fraction: np.ndarray
    #: head: mean |C| over valid and dead elements (dead units count as no change)
    magnitude: np.ndarray
    #: head: L2 norm of C over the valid elements, mean over the round's epochs
    norm: np.ndarray
    #: analysis layer: masked / dead fraction of its elements, dead units / (rows + cols); epoch means
    masked_fraction: np.ndarray
    dead_fraction: np.ndarray
    dead_unit_fraction: np.ndarray
    #: off-diagonal similarity of map r-1 and map r, its permutation null band (unrelated maps), its
    #: noise-ceiling band (an unchanged map, :func:`ceiling_bands`), and the old statistic
    similarity: np.ndarray
    similarity_band: np.ndarray
    ceiling_band: np.ndarray
    similarity_with_diagonal: np.ndarray
    #: mean |change| of the normalised ACF from round r-1 to r, head / all layers, with noise bands
    acf_change_head: np.ndarray
    acf_change_head_band: np.ndarray
    acf_change_all: np.ndarray
    acf_change_all_band: np.ndarray
    #: the same over all consecutive pairs (one number) and its noise band
    acf_variation_head: float
    acf_variation_head_band: tuple[float, float]
    acf_variation_all: float
    acf_variation_all_band: tuple[float, float]
    saturation_round: int | None
    maps: list[np.ndarray] = field(default_factory=list, repr=False)
    acf: ACF | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The per-round statistics as plain lists (NaN stays NaN: write with ``finite_json``)."""
        out: dict[str, Any] = {"head_layers": list(self.head), "rounds": [int(r) for r in self.rounds]}
        for name in ("nonfinite_fraction", "jump_fraction", "magnitude", "norm", "masked_fraction", "dead_fraction",
                     "dead_unit_fraction", "similarity", "similarity_with_diagonal", "acf_change_head", "acf_change_all"):  # fmt: skip
            out[name] = [float(v) for v in getattr(self, name)]
        for name in ("similarity_band", "ceiling_band", "acf_change_head_band", "acf_change_all_band"):
            out[name] = [[float(a), float(b)] for a, b in getattr(self, name)]
        out["acf_variation_head"] = self.acf_variation_head
        out["acf_variation_head_band"] = list(self.acf_variation_head_band)
        out["acf_variation_all"] = self.acf_variation_all
        out["acf_variation_all_band"] = list(self.acf_variation_all_band)
        return out


def _pooled(rec: RoundCME, layers: Sequence[str], name: str) -> np.ndarray:
    return np.stack([rec.stats[n][:, FIELD[name]] for n in layers])  # (layers, epochs)


def client_statistics(
    archive: CMEArchive,
    client: int,
    layer: str,
    head_patterns: Sequence[str] = HEAD_PATTERNS,
    similarity_threshold: float = SIMILARITY_THRESHOLD,
    patience: int = SATURATION_PATIENCE,
    samples: int = NULL_SAMPLES,
    coverage: float = NULL_COVERAGE,
    seed: int = 0,
    ceiling_samples: int = CEILING_SAMPLES,
) -> ClientStatistics:
    """All per-round statistics of one client and their null bands (see :class:`ClientStatistics`)."""
    rounds = np.array(archive.rounds(client))
    layers = archive.layers(client)
    head = head_layers(layers, head_patterns, archive.matrix_layers(client))
    n = len(rounds)
    nan = np.full(n, np.nan)
    epochs = np.zeros(n, dtype=int)
    nonfinite, jump, magnitude, norm = nan.copy(), nan.copy(), nan.copy(), nan.copy()
    masked, dead, dead_units = nan.copy(), nan.copy(), nan.copy()
    worst: list[str] = []
    for j, r in enumerate(rounds):
        rec = archive.read(client, int(r))
        epochs[j] = rec.epochs
        per_layer = np.array([np.nanmax(rec.stat(name, "nonfinite_fraction")) for name in layers])
        nonfinite[j] = float(per_layer.max())
        worst.append(layers[int(per_layer.argmax())] if per_layer.max() > 0 else "")
        if head:
            count, size = _pooled(rec, head, "count"), _pooled(rec, head, "size")
            dead_n = _pooled(rec, head, "dead_fraction") * size
            abs_sum = np.nan_to_num(_pooled(rec, head, "mean_abs")) * count
            jumps = np.nan_to_num(_pooled(rec, head, "jump_fraction")) * count
            with np.errstate(invalid="ignore", divide="ignore"):
                jump[j] = float(np.nanmax(jumps.sum(0) / count.sum(0))) if count.sum() > 0 else np.nan
                magnitude[j] = float(abs_sum.sum() / (count.sum() + dead_n.sum())) if count.sum() + dead_n.sum() > 0 else np.nan
            norm[j] = float(np.mean(np.sqrt((_pooled(rec, head, "l2") ** 2).sum(0))))
        st = rec.stats[layer]
        masked[j] = float(st[:, FIELD["masked_fraction"]].mean())
        dead[j] = float(st[:, FIELD["dead_fraction"]].mean())
        shape = rec.shapes[layer]
        r_, c_ = (1, shape[0]) if len(shape) == 1 else (shape[0], int(np.prod(shape[1:])))
        dead_units[j] = float(((st[:, FIELD["dead_rows"]] + st[:, FIELD["dead_cols"]]) / (r_ + c_)).mean())

    _, maps = round_maps(archive, client, layer)
    sim, sim_diag = nan.copy(), nan.copy()
    sim_band, ceil_band = np.full((n, 2), np.nan), np.full((n, 2), np.nan)
    if n >= 2:
        sim[1:] = consecutive_similarities(maps)
        sim_diag[1:] = consecutive_similarities(maps, diagonal=True)
        sim_band[1:] = similarity_bands(maps, samples, coverage, seed=seed * 7919 + client)
        last = [archive.read(client, int(r)).matrices[layer][-1] for r in rounds]  # the CMEs behind round_maps
        ceil_band[1:] = ceiling_bands(last, ceiling_samples, coverage, seed=seed * 7919 + client)
    sat = (
        saturation_round(maps, list(rounds), similarity_threshold, patience, null_upper=sim_band[1:, 1], ceiling_lower=ceil_band[1:, 0])
        if n >= 2
        else None
    )

    acf = client_acf(archive, client)
    se = acf.se if acf.se is not None else np.full_like(acf.normalised, np.nan)
    hcols = [layers.index(h) for h in head]
    change_head, change_all = nan.copy(), nan.copy()
    band_head, band_all = np.full((n, 2), np.nan), np.full((n, 2), np.nan)
    v_head, v_all = acf_variation(acf.normalised, hcols), acf_variation(acf.normalised)
    vb_head: tuple[float, float] = (float("nan"), float("nan"))
    vb_all = vb_head
    if n >= 2:
        change_head[1:], change_all[1:] = acf_changes(acf.normalised, hcols), acf_changes(acf.normalised)
        band_head[1:], vb_head = acf_change_null(acf.normalised, se, hcols, samples, coverage, seed=seed * 7919 + client)
        band_all[1:], vb_all = acf_change_null(acf.normalised, se, None, samples, coverage, seed=seed * 7919 + client + 1)
    return ClientStatistics(
        client=client,
        model=archive.model(client),
        layer=layer,
        head=tuple(head),
        rounds=rounds,
        epochs=epochs,
        nonfinite_fraction=nonfinite,
        nonfinite_layer=tuple(worst),
        jump_fraction=jump,
        magnitude=magnitude,
        norm=norm,
        masked_fraction=masked,
        dead_fraction=dead,
        dead_unit_fraction=dead_units,
        similarity=sim,
        similarity_band=sim_band,
        ceiling_band=ceil_band,
        similarity_with_diagonal=sim_diag,
        acf_change_head=change_head,
        acf_change_head_band=band_head,
        acf_change_all=change_all,
        acf_change_all_band=band_all,
        acf_variation_head=v_head,
        acf_variation_head_band=vb_head,
        acf_variation_all=v_all,
        acf_variation_all_band=vb_all,
        saturation_round=sat,
        maps=list(maps),
        acf=acf,
    )


# ---------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Verdict:
    """One client's verdict: ``verdict`` is one of :data:`VERDICTS`; ``statistic`` names the number
    behind it, ``value`` is that number and ``band`` its null band (``None`` where the verdict
    rests on no band, e.g. non-finite weights); ``reason`` is one line for people."""

    verdict: str
    statistic: str
    value: float | None
    band: tuple[float, float] | None
    reason: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def _fmt(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else "n/a"


def decide_verdict(
    stats: ClientStatistics,
    peers: Sequence[ClientStatistics] = (),
    coverage: float = NULL_COVERAGE,
    min_rounds: int = MIN_ROUNDS,
    min_epochs: int = MIN_EPOCHS,
    labels: RankTest | None = None,
    updates: RankTest | None = None,
    update_norms: Mapping[int, Mapping[int, float]] | None = None,
) -> Verdict:
    """The decision rule of ``fedsim analyze``: one verdict per client, checked in this order.

    1. ``diverged``: a weight or CME of any layer is non-finite in some round, or the head is
       *exploding*: in some epoch more than :data:`EXPLODING_JUMP_FRACTION` of its valid weights
       moved by more than their own size (median ``|C|`` > 1), or, with peers of the same model,
       in some round its head CME magnitude, its jump fraction and (when recorded,
       ``update_norms``) its update norm all exceed every such peer's by more than clients of
       one model are apart (:func:`exploding_round`; the null is the run's own spread between
       clients, measured on the clients that are not under test, in every model group).
    2. ``undetermined``: fewer than ``min_rounds`` rounds with ``>= min_epochs`` local epochs (the
       ACF needs two epochs per round, its change two rounds), or fewer than
       :data:`MIN_SAME_MODEL_PEERS` other clients with the same model (a contribution can only be
       judged against clients of the same architecture: in the study, comparing across
       architectures called healthy AlexNet-skip clients ``diverged`` in 6 of 10 fault-free mixed
       runs and missed every few-data client), or no noise band could be computed.
    3. ``weak``: no head weight changed in any round (all head units dead: the client contributes
       nothing); or its contribution is the smallest among its same-model peers more often than
       chance allows: given ``updates`` (the :func:`~fedsim.analysis.agreement.update_tests` result
       on the server's ``update_norm``), its update norm, else its head CME magnitude
       (:func:`magnitude_rank_test`); or, given ``labels`` (the
       :func:`~fedsim.analysis.agreement.label_tests` result from ``metrics.jsonl``, also among
       same-model clients), its training labels disagree with its own model more than the other
       clients' do (its train loss is the highest; the later rounds weighted more, ``quadratic``, see
       :data:`LABEL_WEIGHTING`). Null for both:
       exchangeable clients (uniform ranks per round, exact rank-sum distribution); each test at
       half of the one-sided level ``(1 - coverage) / 2``, so together they keep it; and, as an
       effect-size guard that only makes them more conservative, the client must be further from
       its peers than healthy clients of the run's model groups are apart, on average over the
       rounds with the test's weights (:func:`~fedsim.analysis.agreement.outlier_on_average`)
       -- the sec. 3.2
       reading "minimal contribution", extended to wrong labels (docs/cme-validation.md: no CME
       statistic detects those; in 6-client mixed federations the update norm found every
       few-data AlexNet-skip client, the CME magnitude 1 in 10).
    4. ``learning``: the head ACF variation is above the upper edge of its noise band (the ACF
       changes between rounds more than sampling noise explains: the paper's "varying ACF").
    5. ``dominant``: otherwise -- a stable head ACF with a normal-size contribution (the paper's
       "stable ACF: needs little learning", sec. 4.3).

    ``peers`` are the other clients of the run (steps 1 and 3); rounds are matched by number.
    """
    s = stats
    bad = np.flatnonzero(np.nan_to_num(s.nonfinite_fraction) > 0)
    if bad.size:
        j = int(bad[0])
        return Verdict(DIVERGED, "nonfinite_fraction", float(s.nonfinite_fraction[j]), None,
                       f"non-finite weights/CMEs from round {s.rounds[j]} ({s.nonfinite_fraction[j]:.1%} of {s.nonfinite_layer[j]})")  # fmt: skip
    boom = np.flatnonzero(np.nan_to_num(s.jump_fraction) > EXPLODING_JUMP_FRACTION)
    if boom.size:
        j = int(boom[0])
        return Verdict(DIVERGED, "jump_fraction", float(s.jump_fraction[j]), (0.0, EXPLODING_JUMP_FRACTION),
                       f"exploding: in round {s.rounds[j]} {s.jump_fraction[j]:.0%} of the head weights moved by more than "
                       f"their own size in one local epoch (limit {EXPLODING_JUMP_FRACTION:.0%})")  # fmt: skip

    others = [p for p in peers if p.client != s.client]
    same_model = [p for p in others if p.model == s.model]
    groups = [[p for p in others if p.model == m] for m in sorted({p.model for p in others} - {s.model})]
    hit = exploding_round(s, same_model, groups, update_norms)
    if hit is not None:
        r, excess, gap, names = hit
        also = " and its update norm" if "update_norm" in names else ""
        return Verdict(DIVERGED, "magnitude_excess", excess, (-gap, gap),
                       f"exploding: in round {r} its head CME magnitude is {np.exp(excess):.3g}x the largest other {s.model} client's "
                       f"(log excess {excess:.2f} beyond the gap other clients of one model had so far, {gap:.2f}), and so are its jump fraction{also}")  # fmt: skip

    usable = int((s.epochs >= min_epochs).sum())
    vband = s.acf_variation_head_band
    if usable < min_rounds:
        lo, hi = (int(s.epochs.min()), int(s.epochs.max())) if len(s.epochs) else (0, 0)
        epochs = f"{lo}" if lo == hi else f"{lo}-{hi}"
        return Verdict(UNDETERMINED, "rounds", float(usable), None,
                       f"needs >= {min_rounds} rounds with >= {min_epochs} local epochs; has {len(s.rounds)} rounds "
                       f"with {epochs} local epochs")  # fmt: skip

    mag = s.magnitude
    if np.all(np.nan_to_num(mag) == 0):
        return Verdict(WEAK, "magnitude", 0.0, None, "no head weight changed in any round: the client contributes nothing")
    v = s.acf_variation_head
    if len(same_model) < MIN_SAME_MODEL_PEERS:
        acf = ""
        if np.isfinite(v) and np.isfinite(vband[1]):
            acf = f"; its head ACF variation {_fmt(v)} is {'above' if v > vband[1] else 'within'} its noise band [{_fmt(vband[0])}, {_fmt(vband[1])}]"
        return Verdict(UNDETERMINED, "same_model_peers", float(len(same_model)), None,
                       f"needs >= {MIN_SAME_MODEL_PEERS} other clients with the same model ({s.model}) to judge its contribution, "
                       f"has {len(same_model)} (architectures differ systematically in head magnitude and training loss){acf}")  # fmt: skip
    alpha = (1 - coverage) / 4  # the one-sided level (1 - coverage) / 2, split between the two weak tests
    test = updates if updates is not None else magnitude_rank_test(s, same_model, groups)
    if test is not None and test.p_value <= alpha and outlier_on_average(test):
        own, peer_med = float(np.exp(np.median(test.own))), np.exp(np.median(test.peers, axis=1))
        what, stat = ("update norm", "update_norm_rank_sum") if test is updates else ("head CME magnitude", "magnitude_rank_sum")
        return Verdict(WEAK, stat, test.rank_sum, test.band(coverage),
                       f"{what} {_fmt(own)} (median) lowest of {test.clients} {s.model} clients in {test.top_rounds} of "
                       f"{len(test.ranks)} rounds (others {_fmt(float(np.min(peer_med)))}-{_fmt(float(np.max(peer_med)))}); "
                       f"rank-sum p = {test.p_value:.2g} <= {alpha:.3g} if clients were alike; on average over the rounds "
                       "further below the others than healthy clients are apart (as a ratio)")  # fmt: skip
    if labels is not None and labels.p_value <= alpha and outlier_on_average(labels):
        last, peer_last = float(labels.own[-1]), labels.peers[:, -1]
        what = _label_name(labels)
        weighed = "round-weighted " if labels.weighting != "flat" else ""
        return Verdict(WEAK, f"{labels.statistic}_rank_sum", labels.rank_sum, labels.band(coverage),
                       f"its training labels disagree with its model: {what} {_fmt(last)} in round {int(labels.rounds[-1])} (others "
                       f"{_fmt(float(np.min(peer_last)))}-{_fmt(float(np.max(peer_last)))}), highest of {labels.clients} clients in "
                       f"{labels.top_rounds} of {len(labels.ranks)} rounds; {weighed}rank-sum p = {labels.p_value:.2g} <= {alpha:.3g} "
                       "if clients were alike; on average over the rounds further above the others than healthy clients are apart")  # fmt: skip

    checked = _weak_tests_not_met(
        ((test, "update norm" if test is updates else "head CME magnitude"), (labels, _label_name(labels))), alpha
    )
    if not (np.isfinite(v) and np.isfinite(vband[1])):
        return Verdict(UNDETERMINED, "acf_variation_head", v if np.isfinite(v) else None, None,
                       "no noise band for the head ACF variation (the archive lacks the ACF's group terms or valid head elements)"
                       + checked)  # fmt: skip
    if v > vband[1]:
        return Verdict(LEARNING, "acf_variation_head", v, vband,
                       f"head ACF variation {_fmt(v)} above its noise band [{_fmt(vband[0])}, {_fmt(vband[1])}]: the ACF still changes"
                       + checked)  # fmt: skip
    return Verdict(DOMINANT, "acf_variation_head", v, vband,
                   f"head ACF variation {_fmt(v)} within its noise band [{_fmt(vband[0])}, {_fmt(vband[1])}]: stable ACF, needs little learning"
                   + checked)  # fmt: skip


def _label_name(labels: RankTest | None) -> str:
    names = {"train_loss": "train loss", "received_loss": "loss of the received model on its training labels"}
    return "" if labels is None else names.get(labels.statistic, "train loss - test loss")


def _weak_tests_not_met(tests: Sequence[tuple[RankTest | None, str]], alpha: float) -> str:
    """The evidence of the weak tests that did not fire, for the reason of a ``learning`` /
    ``dominant`` client: each test's p-value, and whether only its effect-size guard stopped it (a
    near miss a reader should see rather than a bare healthy-sounding label)."""
    parts = [
        f"{what} p = {t.p_value:.3g}" + (" but not clear of the spread" if t.p_value <= alpha else "") for t, what in tests if t is not None
    ]
    return f"; not weak: {', '.join(parts)} (needs p <= {alpha:.3g} and clear of the spread)" if parts else ""


class ExplodingRound(NamedTuple):
    """:func:`exploding_round`'s finding."""

    round: int
    excess: float
    gap: float
    statistics: tuple[str, ...]


def exploding_round(
    stats: ClientStatistics,
    others: Sequence[ClientStatistics],
    groups: Sequence[Sequence[ClientStatistics]] = (),
    update_norms: Mapping[int, Mapping[int, float]] | None = None,
) -> ExplodingRound | None:
    """The first round in which the client's head *explodes* relative to the other clients of its
    model (``others``), as :class:`ExplodingRound` ``(round, log excess, null gap, statistics)``
    (excess and gap of the head CME magnitude; the statistics that all exceeded), or ``None``.

    For each per-round statistic on a log scale -- the head CME magnitude, the jump fraction and,
    when ``update_norms`` (``{client: {round: norm}}``, the server's ``update_norm`` from
    ``metrics.jsonl``) covers every client involved, the update norm -- the client's *excess* in
    round ``r`` is its value minus the largest other's; the *null gap* of round ``r`` is the
    largest difference up to that round between two other clients of the same model: pairs within
    ``others`` and within each of ``groups`` (the run's other model groups), i.e. how far apart
    clients of this run are when the one under test is left out. The round counts when every
    excess exceeds its gap and, with update norms, the update is at least
    :data:`EXPLODING_UPDATE_RATIO` times the largest other's. Needs at least one pair; rounds with a
    non-finite or zero statistic are left out. The gap grows with the rounds seen so far, not the
    whole run: a client that explodes in round 1 disturbs the aggregate and so its peers' later
    rounds (in the study their magnitudes then differed 20x), which must not hide the explosion.
    With two peers the gap is one pair's difference, a weak null: in the validation study healthy
    and label-noise clients passed it in one round with all three statistics 1.04-1.65x their
    peers', while a diverging client's update was 1e4x or more (docs/cme-validation.md).
    """
    pools = [list(g) for g in (others, *groups) if len(g) >= 2]
    if not pools:
        return None
    everyone = [stats, *others, *(p for g in groups for p in g)]
    common = [r for r in stats.rounds if all(r in p.rounds for p in everyone)]
    if not common:
        return None
    names = ["magnitude", "jump_fraction"]
    if update_norms is not None and all(p.client in update_norms and all(r in update_norms[p.client] for r in common) for p in everyone):
        names.append("update_norm")

    def logs(st: ClientStatistics, name: str) -> np.ndarray:
        if name == "update_norm":
            v = np.array([update_norms[st.client][r] for r in common], dtype=np.float64)  # type: ignore[index]
        else:
            v = np.asarray(getattr(st, name), dtype=np.float64)[[list(st.rounds).index(r) for r in common]]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), np.nan)

    fires = np.ones(len(common), dtype=bool)
    excess_mag = np.full(len(common), np.nan)
    gap_mag = np.full(len(common), np.nan)
    for name in names:
        own = logs(stats, name)
        peer = np.stack([logs(p, name) for p in others]) if others else np.full((1, len(common)), np.nan)
        with np.errstate(invalid="ignore"):
            excess = own - np.max(peer, axis=0)
            pairs = []
            for pool in pools:
                vals = np.stack([logs(p, name) for p in pool])
                pairs += [np.abs(vals[a] - vals[b]) for a in range(len(vals)) for b in range(a + 1, len(vals))]
            gaps = np.stack(pairs)  # (pairs, rounds)
        gap = np.maximum.accumulate(np.max(np.where(np.isfinite(gaps), gaps, -np.inf), axis=0))  # rounds 1..r; -inf: none yet
        fires &= np.isfinite(gap) & (np.nan_to_num(excess, nan=-np.inf) > gap)
        if name == "update_norm":  # and an explosion: an order of magnitude beyond every peer
            fires &= np.nan_to_num(excess, nan=-np.inf) >= np.log(EXPLODING_UPDATE_RATIO)
        if name == "magnitude":
            excess_mag, gap_mag = excess, gap
    hit = np.flatnonzero(fires)
    if hit.size == 0:
        return None
    j = int(hit[0])
    return ExplodingRound(int(common[j]), float(excess_mag[j]), float(gap_mag[j]), tuple(names))


def magnitude_rank_test(
    stats: ClientStatistics, others: Sequence[ClientStatistics], groups: Sequence[Sequence[ClientStatistics]] = ()
) -> RankTest | None:
    """Rank-sum test (:func:`~fedsim.analysis.agreement.rank_sum_test`, ``low``) of the client's
    head CME magnitude against the other clients' over their common rounds, on a **log scale**
    (statistic ``log_magnitude``; a magnitude of 0 counts as ``log(1e-12)``); ``None`` without
    peers or common rounds.

    The ranks and the p-value do not depend on the scale, but the effect-size guard
    (:func:`~fedsim.analysis.agreement.outlier_on_average`: further below the others than they are
    apart) does: a magnitude is a ratio (``|dw / w|``), so "apart" is measured as a ratio too. On
    the linear scale, one peer whose magnitude halved in the last round hid a client 3x below both
    peers in every round (docs/cme-validation.md). ``groups``: the run's other model groups, whose
    spread the guard uses too (:attr:`~fedsim.analysis.agreement.RankTest.spread_groups`)."""
    common = [r for r in stats.rounds if all(r in p.rounds for p in others)]
    if not others or not common:
        return None
    own = np.array([stats.magnitude[list(stats.rounds).index(r)] for r in common], dtype=np.float64)
    peer = np.array([[p.magnitude[list(p.rounds).index(r)] for r in common] for p in others], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        test = rank_sum_test(_log(own), _log(peer), common, "low", "log_magnitude")
    if test is None:
        return None
    spread = []
    for g in groups:
        if len(g) >= 2 and all(r in p.rounds for p in g for r in test.rounds):
            vals = _log(np.array([[p.magnitude[list(p.rounds).index(r)] for r in test.rounds] for p in g], dtype=np.float64))
            if np.all(np.isfinite(vals)):
                spread.append(vals)
    return dataclasses.replace(test, spread_groups=tuple(spread))


def _log(x: np.ndarray) -> np.ndarray:
    """``log(max(x, 1e-12))``, NaN kept (a NaN round is left out of the rank test)."""
    return np.where(np.isnan(x), np.nan, np.log(np.maximum(np.nan_to_num(x, nan=1.0), 1e-12)))


def update_norms_by_client(rows: Sequence[Mapping[str, Any]]) -> dict[int, dict[int, float]]:
    """``{client: {round: update norm}}`` from ``metrics.jsonl`` rows that carry the server's
    ``update_norm`` (``None``, written for a non-finite norm, becomes ``inf``); empty without."""
    norms: dict[int, dict[int, float]] = {}
    for row in rows:
        for c in row.get("clients", []):
            if "update_norm" in c:
                v = c["update_norm"]
                norms.setdefault(int(c["client"]), {})[int(row["round"])] = np.inf if v is None else float(v)
    return norms


def decide_verdicts(
    all_stats: Sequence[ClientStatistics],
    coverage: float = NULL_COVERAGE,
    metrics_rows: Sequence[Mapping[str, Any]] | None = None,
    label_statistic: str = LABEL_STATISTIC,
) -> dict[int, Verdict]:
    """:func:`decide_verdict` for every client of a run, each against the others; with the run's
    ``metrics.jsonl`` rows, the label-agreement test is used too, and when the rows carry the
    server's ``update_norm`` (runs since fedsim records it; not under DP), the update-norm test
    replaces the CME magnitude test and the update norm corroborates an exploding head."""
    rows = list(metrics_rows or [])
    labels = label_tests(rows, label_statistic, weighting=LABEL_WEIGHTING) if rows else {}
    norms = update_norms_by_client(rows)
    updates = update_tests(rows) if norms else {}
    return {
        s.client: decide_verdict(
            s, all_stats, coverage, labels=labels.get(s.client), updates=updates.get(s.client), update_norms=norms or None
        )
        for s in all_stats
    }
