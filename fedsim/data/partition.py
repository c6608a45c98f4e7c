"""Seeded partitioners that split sample indices among federated clients (hospitals).

* ``identical``: every client gets all samples (the CME paper's scenarios 3 and 4);
* ``iid``: shuffle and equipartition (scenarios 1 and 2);
* ``dirichlet``: label skew, per-class client shares drawn from Dir(alpha);
* ``sizes``: shuffle and split by given fractions (hospitals of different size);
* ``sites``: the data folder's own split, one client per site folder (:mod:`fedsim.data.sites`).

A partitioner takes the label vector and returns one sorted index array per client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedsim.registry import Registry


@dataclass(frozen=True)
class PartitionParams:
    """Parameters some partitioners use: ``alpha`` (dirichlet), ``fractions`` (sizes) and
    ``sites`` (sites: the site index of every sample, in the order of the labels)."""

    alpha: float = 0.5
    fractions: tuple[float, ...] = ()
    min_size: int = 2
    sites: tuple[int, ...] = ()


Partitioner = Callable[[np.ndarray, int, int, PartitionParams], list[np.ndarray]]
PARTITIONERS: Registry[Partitioner] = Registry("partitioner")


def list_partitioners() -> list[str]:
    return PARTITIONERS.names()


def partition(name: str, labels: np.ndarray, num_partitions: int, seed: int, params: PartitionParams | None = None) -> list[np.ndarray]:
    """Split ``range(len(labels))`` among ``num_partitions`` clients with partitioner ``name``."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    fn = PARTITIONERS.get(name)
    parts = fn(np.asarray(labels), num_partitions, seed, params or PartitionParams())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


@PARTITIONERS.register("identical")
def identical(labels: np.ndarray, n: int, seed: int, params: PartitionParams) -> list[np.ndarray]:
    return [np.arange(len(labels)) for _ in range(n)]


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, n: int, seed: int, params: PartitionParams) -> list[np.ndarray]:
    if n > len(labels):
        raise ValueError(f"cannot split {len(labels)} samples among {n} clients; use fewer clients")
    perm = np.random.default_rng(seed).permutation(len(labels))
    return list(np.array_split(perm, n))


@PARTITIONERS.register("sizes")
def sizes(labels: np.ndarray, n: int, seed: int, params: PartitionParams) -> list[np.ndarray]:
    fr = np.asarray(params.fractions, dtype=float)
    if len(fr) != n:
        raise ValueError(f"'sizes' needs one fraction per client: got {len(fr)} fractions for {n} clients")
    if np.any(fr <= 0):
        raise ValueError(f"'sizes' fractions must be > 0, got {tuple(fr)}")
    fr = fr / fr.sum()
    perm = np.random.default_rng(seed).permutation(len(labels))
    bounds = np.round(np.cumsum(fr) * len(labels)).astype(int)
    parts = np.split(perm, bounds[:-1])
    if min(len(p) for p in parts) == 0:
        raise ValueError(f"fractions {tuple(params.fractions)} leave a client with no samples out of {len(labels)}")
    return parts


@PARTITIONERS.register("sites")
def sites(labels: np.ndarray, n: int, seed: int, params: PartitionParams) -> list[np.ndarray]:
    """One client per site: client ``k`` gets the samples of site ``k`` (no randomness)."""
    if len(params.sites) != len(labels):
        raise ValueError(
            "partition 'sites' needs the site of every sample: give --data-dir DATA_DIR with one folder per site (DATA_DIR/<site>/...)"
        )
    site = np.asarray(params.sites, dtype=np.int64)
    num_sites = int(site.max()) + 1 if len(site) else 0
    if num_sites != n:
        raise ValueError(f"the data has {num_sites} sites but the run has {n} clients; the number of clients is the number of sites")
    parts = [np.flatnonzero(site == k) for k in range(n)]
    if empty := [k for k, p in enumerate(parts) if len(p) == 0]:
        raise ValueError(f"site(s) {', '.join(map(str, empty))} have no samples left after the global test set")
    return parts


@PARTITIONERS.register("dirichlet")
def dirichlet(labels: np.ndarray, n: int, seed: int, params: PartitionParams) -> list[np.ndarray]:
    """Label-skewed split: for each class, shares ~ Dir(alpha); redrawn until every client has
    at least ``min_size`` samples (at most 1000 draws)."""
    if params.alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {params.alpha}")
    if n * params.min_size > len(labels):
        raise ValueError(f"cannot give {n} clients at least {params.min_size} of {len(labels)} samples each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n, params.alpha))) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.concatenate(p) for p in parts]
        if min(len(p) for p in out) >= params.min_size:
            return out
    raise ValueError(
        f"dirichlet(alpha={params.alpha}) could not give all {n} clients >= {params.min_size} samples "
        "in 1000 draws; raise alpha or use fewer clients"
    )


def split_train_test(indices: Sequence[int] | np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``indices`` into (train, test); test gets round(fraction * n), at least 1."""
    idx = np.asarray(indices, dtype=np.int64)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    if len(idx) < 2:
        raise ValueError(f"need at least 2 samples to split into train and test, got {len(idx)}")
    perm = np.random.default_rng(seed).permutation(idx)
    n_test = min(max(1, round(test_fraction * len(idx))), len(idx) - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def stratified_split(idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, held-out) with ``fraction`` of each class held out (>= 1 per class
    that has >= 2 members), so a small local test set still holds both classes."""
    rest, held = [], []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        if len(members) < 2:
            rest.append(members)
            continue
        r, h = split_train_test(members, fraction, seed + int(c))
        rest.append(r)
        held.append(h)
    cat = lambda xs: np.sort(np.concatenate(xs)) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(rest), cat(held)
