import numpy as np
import pytest

from fedsim.data.partition import PartitionParams, list_partitioners, partition, split_train_test

LABELS = np.arange(200) % 4


@pytest.mark.parametrize(
    ("name", "params"), [("iid", None), ("dirichlet", PartitionParams(alpha=0.3)), ("sizes", PartitionParams(fractions=(0.5, 0.3, 0.2)))]
)
def test_disjoint_complete_and_seeded(name, params):
    parts = partition(name, LABELS, 3, seed=7, params=params)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(LABELS) and set(allidx) == set(range(len(LABELS)))  # complete and disjoint
    again = partition(name, LABELS, 3, seed=7, params=params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(name, LABELS, 3, seed=8, params=params)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_identical_gives_everyone_everything():
    parts = partition("identical", LABELS, 3, seed=0)
    assert all(np.array_equal(p, np.arange(200)) for p in parts)


def test_iid_equipartition_sizes():
    assert [len(p) for p in partition("iid", LABELS, 3, seed=0)] == [67, 67, 66]


def test_sizes_follow_fractions():
    parts = partition("sizes", LABELS, 3, seed=0, params=PartitionParams(fractions=(5, 3, 2)))
    assert [len(p) for p in parts] == [100, 60, 40]


def test_dirichlet_small_alpha_skews_labels():
    def skew(alpha):
        parts = partition("dirichlet", LABELS, 4, seed=3, params=PartitionParams(alpha=alpha))
        # mean over clients of the largest class share
        return np.mean([np.bincount(LABELS[p], minlength=4).max() / len(p) for p in parts])

    assert skew(0.1) > 0.6 > skew(1000.0)
    assert skew(1000.0) < 0.35  # near-uniform labels for huge alpha


@pytest.mark.parametrize(
    ("name", "n", "params", "message"),
    [
        ("iid", 300, None, "cannot split 200 samples among 300 clients"),
        ("dirichlet", 3, PartitionParams(alpha=0), "alpha must be > 0"),
        ("sizes", 3, PartitionParams(fractions=(0.5, 0.5)), "one fraction per client"),
        ("sizes", 2, PartitionParams(fractions=(1.0, -1.0)), "must be > 0"),
        ("nope", 2, None, "unknown partitioner 'nope'; valid choices: dirichlet, identical, iid, sites, sizes"),
    ],
)
def test_bad_input(name, n, params, message):
    with pytest.raises(ValueError, match=message):
        partition(name, LABELS, n, seed=0, params=params)


def test_split_train_test():
    tr, te = split_train_test(np.arange(10, 20), 0.2, seed=1)
    assert len(te) == 2 and len(tr) == 8 and set(tr) | set(te) == set(range(10, 20)) and not set(tr) & set(te)
    assert np.array_equal(split_train_test(np.arange(10, 20), 0.2, seed=1)[1], te)
    with pytest.raises(ValueError, match="at least 2 samples"):
        split_train_test([1], 0.5, seed=0)


def test_list():
    assert list_partitioners() == ["dirichlet", "identical", "iid", "sites", "sizes"]
