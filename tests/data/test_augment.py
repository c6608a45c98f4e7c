"""The AI-CNet3D OCT augmentation: seeded, shape- and range-preserving, each transform p = 0.5."""

from __future__ import annotations

import torch

from fedsim.data.augment import augment_oct


def test_augmentation_is_seeded_keeps_shape_and_range():
    x = torch.rand(3, 1, 8, 12, 7)
    a = augment_oct(x, torch.Generator().manual_seed(5))
    b = augment_oct(x, torch.Generator().manual_seed(5))
    c = augment_oct(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_every_transform_is_sometimes_applied_and_sometimes_not():
    """Over many volumes, some come out unchanged (no transform drawn) and some changed; a
    volume with a left/right gradient is mirrored by the lateral flip alone."""
    ramp = torch.linspace(0.1, 0.9, 6).expand(1, 4, 5, 6).clone()  # intensity grows with W
    out = augment_oct(ramp.expand(64, 1, 4, 5, 6), torch.Generator().manual_seed(0))
    same = [bool(torch.equal(v, ramp)) for v in out]
    assert any(same) and not all(same)
    mirrored = [bool(torch.equal(v, ramp.flip(-1))) for v in out]
    assert any(mirrored)
