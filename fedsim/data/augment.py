"""Seeded augmentation of 3D volumes.

:func:`augment_oct` is fedsim's OCT augmentation for AI-CNet3D (Kenia, Li, Srivastava, Thakoor,
MELBA 2025, arXiv 2510.00882; training recipe, section 3.4): intensity jitter, a zoom-in crop and
the two anatomical flips, each with probability 0.5. The released code's scheme is
:func:`fedsim.clients.tasks.aicnet3d.augment_oct_authors`. Every random number comes from the
``torch.Generator`` it is given, so a client's augmentation is reproducible from its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_oct(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """fedsim's OCT augmentation (the release's scheme is
    :func:`fedsim.clients.tasks.aicnet3d.augment_oct_authors`) on a batch ``(B, 1, D, H, W)`` of
    intensities in [0, 1] (``D``: B-scans superior -> inferior, ``W``: lateral); each transform is
    applied with p = 0.5, parameters drawn from ``gen``:

    * brightness: ``+ U(-0.1, 0.1)``;
    * contrast around the volume mean: ``x U(0.75, 1.25)``;
    * gamma: ``** U(0.7, 1.5)``;
    * zoom by ``U(1, 1.25)`` (trilinear), then a random crop back to the original size;
    * lateral flip (macula <-> nerve side, like a fellow eye);
    * superior <-> inferior flip.

    The result is clamped to [0, 1].
    """
    # Not MONAI's Rand* transforms: each draws from its own RandomState, which would change the seeded (seed, round, client) stream and the results.
    out = []
    shape = x.shape[2:]
    for volume in x:
        v = volume
        r = torch.rand(11, generator=gen)
        if r[0] < 0.5:  # brightness
            v = v + (r[1] - 0.5) * 0.2
        if r[2] < 0.5:  # contrast around the mean
            v = (v - v.mean()) * (0.75 + 0.5 * r[3]) + v.mean()
        if r[4] < 0.5:  # gamma
            v = v.clamp(0, 1) ** (0.7 + 0.8 * r[5])
        if r[6] < 0.5:  # zoom 1-1.25, then a random crop back to the original size
            s = 1.0 + 0.25 * float(r[7])
            big = [max(n, math.ceil(n * s)) for n in shape]
            v = F.interpolate(v[None], size=big, mode="trilinear", align_corners=False)[0]
            off = [int(torch.randint(0, b - n + 1, (1,), generator=gen)) for b, n in zip(big, shape, strict=True)]
            v = v[:, off[0] : off[0] + shape[0], off[1] : off[1] + shape[1], off[2] : off[2] + shape[2]]
        if r[8] < 0.5:  # lateral flip (macula <-> nerve side, like a fellow eye)
            v = v.flip(-1)
        if r[9] < 0.5:  # superior <-> inferior flip
            v = v.flip(-3)
        out.append(v.clamp(0, 1))
    return torch.stack(out)


__all__ = ["augment_oct"]
