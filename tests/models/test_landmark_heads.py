"""Landmark heads: anchor-ball target assignment, loss and medoid decoding; heatmap targets and decoding."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.models.landmark_heads import AnchorHead, HeatmapHead, LandmarkNet, gaussian_heatmaps

NAN = math.nan


def perfect_output(head: AnchorHead, landmarks: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """The raw output a perfect anchor head would give: +20 logits for the owner, -20 elsewhere,
    offsets = atanh(target)."""
    owner, target = head.assign(landmarks, grid)
    b, a = owner.shape[:2]
    num_l = head.num_landmarks
    raw = torch.empty(b, a, 3 + num_l, *grid, dtype=torch.float64)
    raw[:, :, :3] = torch.atanh(target.double().clamp(-1 + 1e-12, 1 - 1e-12))
    for k in range(num_l):
        raw[:, :, 3 + k] = torch.where(owner == k, 20.0, -20.0)
    return raw.view(b, -1, *grid)


def test_anchor_assignment_by_hand():
    head = AnchorHead(4, 1, stride=4)
    # grid units u = (p + 0.5) / 4 - 0.5 = (5.25, 6.0, 3.5)
    lm = torch.tensor([[[22.5, 25.5, 15.5]]])
    owner, target = head.assign(lm, (10, 10, 8))
    # cells within r on every axis: u=5.25 -> {5} for r=.5, {5,6} for .75 and 1, {4,5,6} for 1.25;
    # u=6 -> {6} for r <= .75, {5,6,7} for r >= 1; u=3.5 -> {3,4} for every radius
    assert [(owner[0, a] == 0).sum().item() for a in range(4)] == [1 * 1 * 2, 2 * 1 * 2, 2 * 3 * 2, 3 * 3 * 2]
    assert owner[0, 0, 5, 6, 3] == 0 and owner[0, 0, 5, 6, 4] == 0 and owner[0, 0, 6, 6, 3] == -1
    torch.testing.assert_close(target[0, 0, :, 5, 6, 3], torch.tensor([0.25, 0.0, 0.5]) / 0.5)
    torch.testing.assert_close(target[0, 3, :, 4, 7, 4], torch.tensor([1.25, -1.0, -0.5]) / 1.25)


def test_nearest_landmark_owns_a_shared_cell_and_missing_landmarks_own_nothing():
    head = AnchorHead(4, 3, stride=4)
    # landmark 0 at u=(2.2, 2, 2), landmark 1 at u=(2.9, 2, 2), landmark 2 missing
    p = lambda u: [(x + 0.5) * 4 - 0.5 for x in u]  # noqa: E731
    lm = torch.tensor([[p((2.2, 2, 2)), p((2.9, 2, 2)), [NAN] * 3]])
    owner, _ = head.assign(lm, (6, 6, 6))
    assert owner[0, 3, 2, 2, 2] == 0 and owner[0, 3, 3, 2, 2] == 1  # cell 2 is nearer to 0, cell 3 to 1
    assert not (owner == 2).any()


def test_assignment_and_decoding_recover_known_landmarks_exactly():
    """On the stride-4 grid of a 64 x 64 x 32 crop: landmarks anywhere (centre, off-centre, next
    to the border, two close together) are decoded exactly from a perfect output."""
    head = AnchorHead(8, 5, stride=4)
    grid = (16, 16, 8)
    lm = torch.tensor(
        [
            [[10.0, 20.0, 5.0], [33.3, 2.7, 17.9], [0.0, 63.0, 31.0], [40.2, 40.0, 12.1], [41.9, 41.1, 13.0]],
            [[7.7, 55.5, 3.3], [NAN] * 3, [62.4, 0.6, 0.2], [30.0, 31.0, 16.0], [NAN] * 3],
        ],
        dtype=torch.float64,
    )
    dec = head.decode(perfect_output(head, lm, grid))
    present = ~torch.isnan(lm).any(-1)
    torch.testing.assert_close(dec[present].double(), lm[present], atol=1e-5, rtol=0)  # float32 targets


def test_anchor_loss_is_small_for_a_perfect_output_and_mines_hard_negatives_for_missing_landmarks():
    head = AnchorHead(8, 2, stride=4, missing_negatives=7)
    grid = (8, 8, 4)
    lm = torch.tensor([[[10.0, 12.0, 5.0], [NAN] * 3]])
    perfect = perfect_output(head, lm, grid).float()
    assert head.loss(perfect, lm) < 1e-6
    noisy = perfect + torch.randn_like(perfect)
    assert head.loss(noisy, lm) > 0.1
    # every anchor of the missing landmark is a negative; only the 7 highest logits are penalised
    raw = torch.randn(1, 4 * (3 + 2), *grid, generator=torch.Generator().manual_seed(0)).requires_grad_()
    head.loss(raw, lm).backward()
    negative = (head.assign(lm, grid)[0] == -1).flatten()  # cells no landmark owns
    g = raw.grad.view(1, 4, 5, *grid)[:, :, 4].flatten()[negative]  # logits of landmark 1 (missing)
    logits = raw.detach().view(1, 4, 5, *grid)[:, :, 4].flatten()[negative]
    hit = g != 0
    assert hit.sum() == 7
    assert set(hit.nonzero().flatten().tolist()) == set(logits.topk(7).indices.tolist())


def test_anchor_head_learns_on_a_fixed_batch():
    torch.manual_seed(0)
    feats = torch.eye(512).view(512, 2, 8, 8, 4).movedim(1, 0)  # one channel per (sample, cell): learnable
    head = AnchorHead(512, 3, stride=4)
    lm = torch.tensor([[[10.0, 12.0, 5.0], [20.0, 3.0, 9.0], [NAN] * 3], [[1.0, 2.0, 3.0], [NAN] * 3, [30.0, 30.0, 14.0]]])
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = head.loss(head(feats), lm)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]
    err = (head.decode(head(feats)) - lm).norm(dim=-1)
    assert err[~torch.isnan(err)].max() < 0.5  # voxels


def test_gaussian_heatmaps_and_heatmap_decoding():
    lm = torch.tensor([[[5.0, 10.0, 7.0], [20.4, 2.2, 9.6], [NAN] * 3]])
    t = gaussian_heatmaps(lm, (24, 16, 12), sigma=2.0)
    assert t.shape == (1, 3, 24, 16, 12)
    assert t[0, 0, 5, 10, 7] == 1.0 and t[0, 2].abs().max() == 0
    # value by hand: one voxel away on x and y from landmark 0 -> exp(-2 / (2 * 4))
    assert t[0, 0, 6, 11, 7].item() == pytest.approx(math.exp(-2 / 8), rel=1e-6)
    head = HeatmapHead(4, 3, stride=1, sigma=2.0)
    dec = head.decode(t)
    torch.testing.assert_close(dec[0, :2], lm[0, :2], atol=1e-4, rtol=0)  # exact for Gaussian peaks
    assert head.loss(t, lm) == 0


def test_heatmap_head_upsamples_to_the_input_and_landmarknet_delegates():
    torch.manual_seed(0)
    backbone = torch.nn.Conv3d(1, 6, 3, stride=4, padding=1)
    backbone.stride = 4  # type: ignore[assignment]
    net = LandmarkNet(backbone, HeatmapHead(6, 2, stride=4))
    x = torch.randn(2, 1, 16, 16, 8)
    out = net(x)
    assert out.shape == (2, 2, 16, 16, 8)
    assert net.decode(out).shape == (2, 2, 3)
    lm = torch.tensor([[[3.0, 4.0, 5.0], [NAN] * 3], [[1.0, 1.0, 1.0], [9.0, 9.0, 2.0]]])
    net.loss(out, lm).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_heads_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_landmarks"):
        AnchorHead(4, 0)
    with pytest.raises(ValueError, match="sigma"):
        HeatmapHead(4, 2, sigma=0)
