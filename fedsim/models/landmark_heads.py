"""Landmark-detection heads for 3D volumes: H3DE-Net's anchor-ball head and a heatmap baseline.

Both heads sit on a backbone's feature map (``(B, C, X/s, Y/s, Z/s)`` at stride ``s``) and offer
the same three calls, so the client task is head-agnostic:

* ``forward(features)``: the raw output;
* ``loss(output, landmarks)``: the training loss against landmark voxel coordinates
  ``(B, L, 3)`` (``NaN`` rows = missing landmarks);
* ``decode(output)``: predicted voxel coordinates ``(B, L, 3)``.

Coordinates are voxel indices of the network input (voxel centres at integers). A feature cell
``i`` at stride ``s`` covers input voxels ``s*i .. s*i + s - 1``; in *grid units*
``u = (p + 0.5) / s - 0.5`` its centre is ``u = i``.

**Anchor-ball head** (H3DE-Net, arXiv 2502.14221): a 1x1x1 convolution predicts, per cell and
for each of 4 anchors with radii ``(0.5, 0.75, 1, 1.25)`` cells, 3 offsets and ``L`` landmark
logits. Two variants of targets, loss and decoding exist (``scheme``):

``scheme="fedsim"`` (the default; fedsim's own design, *not* the authors' loss): a cell/anchor is
*positive* for a landmark when the landmark lies within the anchor on every axis (``|u_l - i| <=
r`` per axis); when several landmarks qualify, the nearest owns it. Offsets are ``tanh``-bounded,
``u = i + r * tanh(o)``, and regressed with SmoothL1 (beta 1/9, summed over xyz, per positive)
against ``(u_l - i) / r``. Classification: BCE on the owner's logit at positive cells,
down-weighted BCE (``other_weight`` 0.1) on the other landmarks' logits there, and hard-negative
mining everywhere else: per sample and landmark the highest-scoring negative cells (``neg_ratio``
3 per positive, weight 1; for a **missing landmark**, which has no positive anywhere, the
``missing_negatives`` 32 highest) are pushed to 0. Decoding: the ``topk`` (15) highest-scoring
anchors of the sample vote with their decoded positions and their score-weighted **medoid** is
the prediction: each distance is weighted by the other candidate's probability (``sigmoid`` of
its logit), so a landmark with fewer than 15 positive anchors (near the border, or sharing cells
with a neighbour) is not outvoted by the low-scoring anchors that fill up its top 15. Grid units
``u = (p + 0.5) / s - 0.5`` put a cell's centre at the centre of the ``s`` voxels it covers.

``scheme="authors"`` (the released code: ``data_utils/transforms.LandmarkProposal``,
``models/losses.HNM_propmap``, ``utils.metric_proposal``): grid units ``u = p / s`` (a cell's
anchor sits on its first voxel, 1.5 voxels from the centre of the 4 it covers at stride 4);
positive when ``|u_l - i| < r`` on every axis (strict), and a cell/anchor inside the balls of
several landmarks is a positive of *each* (one proposal per landmark). With ``P`` positive
proposals the loss is

* ``BCE(owner logit, 1)`` averaged over the ``P`` proposals;
* ``1/(L-1) * BCE(other landmarks' logits, 0)`` averaged over the ``P (L-1)`` logits;
* for each landmark missing in ``m`` samples of the batch: the ``m * A * 256`` highest logits of
  that landmark over the *whole batch* (all samples, anchors and cells, positives included;
  all of them when the map is smaller, where the release's ``topk`` would fail), all
  concatenated, ``0.2 * BCE(., 0)`` averaged over them;
* ``0.001 * BCE(raw output, 0)`` averaged over *every* output value, the 3 offset channels
  included (a quirk of the release, kept);
* ``SmoothL1(tanh(o), (u_l - i) / r)`` with beta 1, averaged over the ``3 P`` values.

Decoding takes the top 15 anchors of the sample and their plain (unweighted) medoid at
``(i + r tanh(o)) * s``. (The release takes the top 15 over the whole evaluation batch, which is
the same at its batch size 1; its truncation to 400 proposals per anchor and sample never
applies to 14 landmarks, at most 27 cells each.)


**Heatmap head** (the usual baseline): a 1x1x1 convolution to ``L`` channels, upsampled
(trilinear) to the input resolution; targets are Gaussians of ``sigma`` voxels at present
landmarks and all-zero maps for missing ones; loss is a foreground-weighted MSE; decoding takes
each map's arg-max voxel and refines it per axis with a parabola through the log-values of the
peak and its neighbours (sub-voxel, exact for a Gaussian peak).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ANCHOR_RADII = (0.5, 0.75, 1.0, 1.25)
#: Target / loss / decoding schemes of :class:`AnchorHead` (see the module docstring).
ANCHOR_SCHEMES = ("fedsim", "authors")
#: The authors' ``HNM_propmap`` constants: hard negatives per missing landmark and anchor, their
#: weight, and the weight of the whole-map background BCE.
AUTHORS_HARD_NUM, AUTHORS_HNM_WEIGHT, AUTHORS_NOOBJ_WEIGHT = 256, 0.2, 0.001


def _spatial(x: torch.Tensor) -> tuple[int, int, int]:
    """The spatial size ``(X, Y, Z)`` of a ``(B, C, X, Y, Z)`` tensor."""
    _, _, nx, ny, nz = x.shape
    return nx, ny, nz


def _grid_centres(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Cell centres in grid units, ``(3, gx, gy, gz)``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


class AnchorHead(nn.Module):
    """H3DE-Net's anchor-ball head (see the module docstring)."""

    def __init__(
        self,
        in_channels: int,
        num_landmarks: int,
        stride: int = 4,
        radii: tuple[float, ...] = ANCHOR_RADII,
        other_weight: float = 0.1,
        neg_ratio: int = 3,
        missing_negatives: int = 32,
        topk: int = 15,
        scheme: str = "fedsim",
    ) -> None:
        super().__init__()
        if num_landmarks < 1 or stride < 1 or not radii or min(radii) <= 0:
            raise ValueError(f"need num_landmarks >= 1, stride >= 1 and positive radii; got {num_landmarks}, {stride}, {radii}")
        if scheme not in ANCHOR_SCHEMES:
            raise ValueError(f"unknown anchor-head scheme {scheme!r}; valid choices: {', '.join(ANCHOR_SCHEMES)}")
        self.scheme = scheme
        self.num_landmarks = num_landmarks
        self.stride = stride
        self.radii = tuple(float(r) for r in radii)  # not a buffer: models are also built on "meta"
        self.other_weight = other_weight
        self.neg_ratio = neg_ratio
        self.missing_negatives = missing_negatives
        self.topk = topk
        self.conv = nn.Conv3d(in_channels, len(radii) * (3 + num_landmarks), 1)

    @property
    def num_anchors(self) -> int:
        return len(self.radii)

    def _radii(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.radii, device=like.device, dtype=like.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, C, gx, gy, gz)`` -> raw output ``(B, A * (3 + L), gx, gy, gz)``."""
        return self.conv(features)

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw output -> (offsets ``(B, A, 3, *G)`` in (-1, 1), logits ``(B, A, L, *G)``)."""
        b, _, *g = out.shape
        out = out.view(b, self.num_anchors, 3 + self.num_landmarks, *g)
        return torch.tanh(out[:, :, :3]), out[:, :, 3:]

    def to_grid(self, p: torch.Tensor) -> torch.Tensor:
        """Voxel coordinates -> grid units (``p / s`` for the authors' scheme)."""
        if self.scheme == "authors":
            return p / self.stride
        return (p + 0.5) / self.stride - 0.5

    def to_voxel(self, u: torch.Tensor) -> torch.Tensor:
        """Grid units -> voxel coordinates (``u * s`` for the authors' scheme)."""
        if self.scheme == "authors":
            return u * self.stride
        return (u + 0.5) * self.stride - 0.5

    def authors_targets(self, landmarks: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The authors' proposals: ``inside`` ``(B, A, L, G)`` (strict ``|u_l - i| < r`` on every
        axis, any number of landmarks per cell) and offset targets ``(B, A, L, 3, G)`` =
        ``(u_l - i) / r`` (NaN for missing landmarks)."""
        u = self.to_grid(landmarks.float())  # (B, L, 3)
        centres = _grid_centres(grid, landmarks.device, torch.float32).flatten(1)  # (3, G)
        d = u[:, :, :, None] - centres[None, None]  # (B, L, 3, G)
        r = self._radii(u)[None, :, None, None, None]  # (1, A, 1, 1, 1)
        inside = (d.abs()[:, None] < r).all(3)  # (B, A, L, G); NaN compares False
        return inside, d[:, None] / r

    def authors_loss(self, out: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """The released ``HNM_propmap`` loss (see the module docstring), vectorised."""
        b = out.shape[0]
        a, num_l = self.num_anchors, self.num_landmarks
        raw = out.view(b, a, 3 + num_l, -1)  # (B, A, 3 + L, G)
        inside, target = self.authors_targets(landmarks, _spatial(out))  # (B, A, L, G), (B, A, L, 3, G)
        logits = raw[:, :, 3:]  # (B, A, L, G)
        bce = F.binary_cross_entropy_with_logits
        loss = AUTHORS_NOOBJ_WEIGHT * bce(out, torch.zeros_like(out))
        n_pos = int(inside.sum())
        if n_pos:
            loss = loss + bce(logits[inside], torch.ones(n_pos, device=out.device, dtype=out.dtype))
            if num_l > 1:  # the other landmarks' logits at every positive proposal
                idx = inside.permute(0, 1, 3, 2).nonzero()  # (P, 4): sample, anchor, cell, owner
                rows = logits.permute(0, 1, 3, 2)[idx[:, 0], idx[:, 1], idx[:, 2]]  # (P, L)
                keep = torch.ones_like(rows, dtype=torch.bool)
                keep[torch.arange(n_pos, device=out.device), idx[:, 3]] = False
                neg = rows[keep]
                loss = loss + bce(neg, torch.zeros_like(neg)) / (num_l - 1)
            off = torch.tanh(raw[:, :, :3])  # (B, A, 3, G)
            pred = off[:, :, None].expand(b, a, num_l, 3, off.shape[-1]).permute(0, 1, 2, 4, 3)[inside]  # (P, 3)
            tgt = target.permute(0, 1, 2, 4, 3)[inside]
            loss = loss + F.smooth_l1_loss(pred, tgt, beta=1.0)
        missing = torch.isnan(landmarks).any(-1)  # (B, L)
        hard = []
        for lm in range(num_l):
            m = int(missing[:, lm].sum())
            if m:
                values = logits[:, :, lm].reshape(-1)
                hard.append(values.topk(min(m * a * AUTHORS_HARD_NUM, values.numel())).values)
        if hard:
            h = torch.cat(hard)
            loss = loss + AUTHORS_HNM_WEIGHT * bce(h, torch.zeros_like(h))
        return loss

    @torch.no_grad()
    def assign(self, landmarks: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets for ``landmarks`` ``(B, L, 3)`` (NaN = missing) on a ``grid`` of cells.

        Returns ``owner`` ``(B, A, *grid)`` (landmark index, ``-1`` = negative) and the offset
        targets ``(B, A, 3, *grid)`` in [-1, 1] (``(u_l - i) / r``, meaningful where ``owner >= 0``).
        """
        b, num_l, _ = landmarks.shape
        dev = landmarks.device
        u = self.to_grid(landmarks.float())  # (B, L, 3)
        centres = _grid_centres(grid, dev, torch.float32).flatten(1)  # (3, G)
        d = u[:, :, :, None] - centres[None, None]  # (B, L, 3, G)
        r = self._radii(u)[None, :, None, None, None]  # (1, A, 1, 1, 1)
        inside = (d.abs()[:, None] <= r).all(3)  # (B, A, L, G); NaN compares False -> missing never inside
        dist = torch.where(inside, (d**2).sum(2)[:, None], torch.full_like(inside, torch.inf, dtype=torch.float32))
        best, owner = dist.min(2)  # (B, A, G)
        owner = torch.where(torch.isfinite(best), owner, torch.full_like(owner, -1))
        idx = owner.clamp(min=0)[:, :, None, None, :].expand(b, self.num_anchors, 1, 3, centres.shape[1])
        d_owner = torch.gather(d[:, None].expand(b, self.num_anchors, num_l, 3, -1), 2, idx)[:, :, 0]  # (B, A, 3, G)
        target = (d_owner / r[:, :, 0]).nan_to_num(0.0).clamp(-1.0, 1.0)
        return owner.view(b, self.num_anchors, *grid), target.view(b, self.num_anchors, 3, *grid)

    def loss(self, out: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """The training loss of the head's ``scheme``: fedsim's (offset SmoothL1 + owner BCE +
        down-weighted other-landmark BCE + hard-negative BCE) or :meth:`authors_loss`."""
        if self.scheme == "authors":
            return self.authors_loss(out, landmarks)
        off, logits = self._split(out)
        b, a, num_l = logits.shape[:3]
        owner, target = self.assign(landmarks, _spatial(out))
        owner, target = owner.flatten(2), target.flatten(3)  # (B, A, G), (B, A, 3, G)
        off, logits = off.flatten(3), logits.flatten(3)  # (B, A, 3, G), (B, A, L, G)
        pos = owner >= 0
        n_pos = max(int(pos.sum()), 1)
        off_pos = off.permute(0, 1, 3, 2)[pos]  # (P, 3)
        tgt_pos = target.permute(0, 1, 3, 2)[pos]
        loss_off = F.smooth_l1_loss(off_pos, tgt_pos, beta=1 / 9, reduction="sum") / n_pos
        logit_pos = logits.permute(0, 1, 3, 2)[pos]  # (P, L)
        onehot = F.one_hot(owner[pos], num_l).to(logit_pos.dtype)
        bce_pos = F.binary_cross_entropy_with_logits(logit_pos, onehot, reduction="none")
        loss_cls = (bce_pos * onehot).sum() / n_pos
        if num_l > 1:
            loss_cls = loss_cls + self.other_weight * (bce_pos * (1 - onehot)).sum() / (n_pos * (num_l - 1))
        # hard negatives: cells owned by no landmark, per (sample, landmark)
        neg_logits = logits.permute(0, 2, 1, 3).reshape(b, num_l, -1)  # (B, L, A*G)
        neg_mask = (~pos)[:, None].expand(b, num_l, a, pos.shape[-1]).reshape(b, num_l, -1)
        neg_logits = neg_logits.masked_fill(~neg_mask, -torch.inf)
        pos_per = F.one_hot(owner.clamp(min=0), num_l).mul(pos[..., None]).sum((1, 2))  # (B, L)
        missing = torch.isnan(landmarks).any(-1)
        k = torch.where(missing, torch.full_like(pos_per, self.missing_negatives), pos_per * self.neg_ratio)
        k = torch.minimum(k, neg_mask[:, :1].sum(-1))  # no more than the sample's negatives
        kmax = int(k.max())
        loss_neg = logits.new_zeros(())
        if kmax > 0:
            top = neg_logits.topk(kmax, dim=-1).values  # (B, L, kmax)
            keep = torch.arange(kmax, device=out.device)[None, None] < k[..., None]
            bce_neg = F.binary_cross_entropy_with_logits(top.clamp(min=-100), torch.zeros_like(top), reduction="none")
            loss_neg = (bce_neg * keep).sum() / keep.sum().clamp(min=1)
        return loss_off + loss_cls + loss_neg

    @torch.no_grad()
    def decode(self, out: torch.Tensor) -> torch.Tensor:
        """Per landmark the score-weighted medoid of the ``topk`` highest-scoring anchors' positions:
        ``(B, L, 3)`` voxel coordinates."""
        off, logits = self._split(out)
        b, _, num_l = logits.shape[:3]
        grid = _spatial(out)
        centres = _grid_centres(grid, out.device, off.dtype).flatten(1)  # (3, G)
        r = self._radii(off)[None, :, None, None]
        pos = self.to_voxel(centres[None, None] + r * off.flatten(3))  # (B, A, 3, G)
        pos = pos.permute(0, 1, 3, 2).reshape(b, -1, 3)  # (B, A*G, 3)
        scores = logits.flatten(3).permute(0, 2, 1, 3).reshape(b, num_l, -1)  # (B, L, A*G)
        k = min(self.topk, scores.shape[-1])
        top = scores.topk(k, dim=-1)  # (B, L, k)
        cand = torch.gather(pos[:, None].expand(b, num_l, -1, 3), 2, top.indices[..., None].expand(b, num_l, k, 3))
        flat = cand.reshape(b * num_l, k, 3).double()
        if self.scheme == "authors":  # plain medoid (utils.min_distance_voting)
            weight = torch.ones(b * num_l, 1, k, dtype=torch.float64, device=out.device)
        else:
            weight = torch.sigmoid(top.values.double()).reshape(b * num_l, 1, k)
        medoid = (torch.cdist(flat, flat) * weight).sum(-1).argmin(-1).view(b, num_l)
        return torch.gather(cand, 2, medoid[..., None, None].expand(b, num_l, 1, 3))[:, :, 0]


def gaussian_heatmaps(landmarks: torch.Tensor, shape: tuple[int, int, int], sigma: float) -> torch.Tensor:
    """Target maps ``(B, L, *shape)``: ``exp(-|x - p|^2 / (2 sigma^2))`` at present landmarks, 0 for
    missing ones (computed as a product of three 1D Gaussians: it is separable)."""
    # Not MONAI's GenerateHeatmap: it rounds each centre to a voxel, truncates at 4 sigma and drops points outside the grid.
    p = landmarks.float()
    g = [torch.exp(-((torch.arange(n, device=p.device) - p[..., i, None]) ** 2) / (2 * sigma**2)) for i, n in enumerate(shape)]
    return (g[0][..., :, None, None] * g[1][..., None, :, None] * g[2][..., None, None, :]).nan_to_num(0.0)


class HeatmapHead(nn.Module):
    """Heatmap-regression baseline head (see the module docstring)."""

    def __init__(self, in_channels: int, num_landmarks: int, stride: int = 1, sigma: float = 2.0, fg_weight: float = 20.0) -> None:
        super().__init__()
        if num_landmarks < 1 or stride < 1 or sigma <= 0:
            raise ValueError(f"need num_landmarks >= 1, stride >= 1 and sigma > 0; got {num_landmarks}, {stride}, {sigma}")
        self.num_landmarks = num_landmarks
        self.stride = stride
        self.sigma = sigma
        self.fg_weight = fg_weight
        self.conv = nn.Conv3d(in_channels, num_landmarks, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, C, X/s, Y/s, Z/s)`` -> heatmaps ``(B, L, X, Y, Z)``."""
        h = self.conv(features)
        if self.stride > 1:
            h = F.interpolate(h, scale_factor=self.stride, mode="trilinear", align_corners=False)
        return h

    def loss(self, out: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """MSE weighted by ``1 + fg_weight * target`` (the landmark peaks are a tiny fraction of voxels)."""
        t = gaussian_heatmaps(landmarks, _spatial(out), self.sigma)
        w = 1.0 + self.fg_weight * t
        return (w * (out - t) ** 2).sum() / w.sum()

    @torch.no_grad()
    def decode(self, out: torch.Tensor) -> torch.Tensor:
        """Arg-max voxel of each map, refined per axis by fitting a parabola to the log-values at
        the peak and its two neighbours (exact for a Gaussian peak): ``(B, L, 3)`` voxel coordinates."""
        shape = out.shape[2:]
        flat = out.flatten(2).float()
        am = flat.argmax(-1)  # (B, L)
        peak = torch.stack([am // (shape[1] * shape[2]), (am // shape[2]) % shape[1], am % shape[2]], -1)  # (B, L, 3)
        strides = (shape[1] * shape[2], shape[2], 1)
        log = lambda i: torch.gather(flat, 2, i[..., None])[..., 0].clamp(min=1e-6).log()  # noqa: E731
        centre = log(am)
        refined = []
        for axis in range(3):
            inner = (peak[..., axis] > 0) & (peak[..., axis] < shape[axis] - 1)
            lo = log(torch.where(inner, am - strides[axis], am))
            hi = log(torch.where(inner, am + strides[axis], am))
            curv = lo + hi - 2 * centre  # < 0 at a strict maximum
            delta = torch.where(inner & (curv < 0), 0.5 * (lo - hi) / curv.clamp(max=-1e-12), torch.zeros_like(curv))
            refined.append(peak[..., axis].float() + delta.clamp(-0.5, 0.5))
        return torch.stack(refined, -1)


class LandmarkNet(nn.Module):
    """A backbone (features at ``backbone.stride``) followed by a landmark head."""

    def __init__(self, backbone: nn.Module, head: AnchorHead | HeatmapHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def loss(self, out: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return self.head.loss(out, landmarks)

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        return self.head.decode(out)


__all__ = ["ANCHOR_RADII", "ANCHOR_SCHEMES", "AnchorHead", "HeatmapHead", "LandmarkNet", "gaussian_heatmaps"]
