"""Fault specs and the pure fault functions, against hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.faults import (
    FAULT_KINDS,
    Fault,
    FaultSpecError,
    few_data,
    free_rider_noise,
    lr_factor,
    noisy_labels,
    parse_fault,
    parse_faults,
    swapped_targets,
)


def test_parse_with_and_without_level():
    assert parse_fault("1:few-data:0.25") == Fault(1, "few-data", 0.25)
    assert parse_fault(" 2 : free-rider ") == Fault(2, "free-rider", FAULT_KINDS["free-rider"])
    assert str(parse_fault("0:diverge:1e4")) == "0:diverge:10000"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1", "expected CLIENT:KIND\\[:LEVEL\\]"),
        ("x:lazy", "CLIENT must be a client index"),
        ("1:sleepy", "unknown fault kind 'sleepy'.*valid kinds: few-data, label-noise, lazy, free-rider, diverge"),
        ("1:few-data:0", "share in \\(0, 1\\]"),
        ("1:label-noise:1.5", "share in \\(0, 1\\]"),
        ("1:lazy:-1", "must be >= 0"),
        ("1:lazy:nan", "must be finite"),
        ("1:lazy:fast", "LEVEL must be a number"),
    ],
)
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(FaultSpecError, match=message):
        parse_fault(text)


def test_client_range_and_duplicates_are_checked():
    with pytest.raises(FaultSpecError, match=r"names client 3, but the run has clients 0\.\.2"):
        parse_faults(["3:lazy"], 3)
    with pytest.raises(FaultSpecError, match="client 1 has fault 'lazy' twice"):
        parse_faults(["1:lazy:0.1", "1:lazy:0.2"], 3)
    assert parse_faults(["1:lazy:0.5", "1:few-data:0.5"], 3) == (Fault(1, "lazy", 0.5), Fault(1, "few-data", 0.5))


def test_lr_factor():
    faults = parse_faults(["0:lazy:0.1", "1:diverge:1000", "2:free-rider"], 4)
    assert [lr_factor(faults, k) for k in range(4)] == [0.1, 1000.0, 0.0, 1.0]


def test_few_data_keeps_the_share_seeded():
    idx = np.arange(100, 150)
    kept = few_data(idx, 0.1, seed=3, client=1)
    assert len(kept) == 5 and set(kept) <= set(idx) and np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(kept, few_data(idx, 0.1, seed=3, client=1))
    assert not np.array_equal(kept, few_data(idx, 0.1, seed=4, client=1))
    assert len(few_data(idx[:6], 0.1, seed=0, client=0)) == 2  # never below two samples


def test_noisy_labels_flip_exactly_the_share_to_other_classes():
    labels = np.arange(200) % 4
    train = np.arange(0, 200, 2)  # 100 training samples
    noisy = noisy_labels(labels, train, 0.5, 4, seed=0, client=2)
    changed = np.flatnonzero(noisy != labels)
    assert len(changed) == 50 and set(changed) <= set(train)  # test labels untouched
    assert np.all((noisy >= 0) & (noisy < 4))
    np.testing.assert_array_equal(labels, np.arange(200) % 4)  # input not modified


def test_swapped_targets_is_a_partial_derangement():
    perm = swapped_targets(20, 0.5, seed=1, client=0)
    moved = np.flatnonzero(perm != np.arange(20))
    assert len(moved) == 10 and sorted(perm) == list(range(20))


def test_free_rider_noise_scale():
    noise = free_rider_noise((200, 200), 1e-3, 2.0, seed=0, client=1, server_round=3, salt=0)
    assert noise.std() == pytest.approx(2e-3, rel=0.02)
