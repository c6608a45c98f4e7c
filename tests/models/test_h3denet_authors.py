"""The ``authors`` scheme of H3DE-Net: the anchor head's targets, loss and decoding against a
loop-by-loop re-implementation of the released code's formulas (``LandmarkProposal``,
``HNM_propmap``, ``metric_proposal``), and the BRA with the authors' head count and scale
against a plain multi-head attention reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedsim.config import ConfigError
from fedsim.models import build_model
from fedsim.models.h3denet import WIDTHS, BiLevelRoutingAttention3d, H3DEBackbone
from fedsim.models.landmark_heads import AnchorHead

RADII = (0.5, 0.75, 1.0, 1.25)


def authors_loss_reference(out: torch.Tensor, landmarks: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """The released loss written the way the release computes it: proposals per sample, anchor and
    landmark over the cells ``max(0, int(u - r)) .. ceil(u + r)`` with the strict ``|d| < r`` test;
    BCE means over the lists; hard negatives over the whole batch's map of a missing landmark."""
    b, _, gx, gy, gz = out.shape
    a, num_l = len(RADII), landmarks.shape[1]
    pm = out.view(b, a, 3 + num_l, gx, gy, gz).permute(0, 3, 4, 5, 1, 2)  # (B, c, w, h, A, 3 + L)
    pos, neg, reg_p, reg_t = [], [], [], []
    hard_count = [0] * num_l
    for i in range(b):
        for ai, r in enumerate(RADII):
            for lm in range(num_l):
                p = landmarks[i, lm]
                if torch.isnan(p).any():
                    hard_count[lm] += 1
                    continue
                u = (p / stride).tolist()
                for c in range(max(0, int(u[0] - r)), min(math.ceil(u[0] + r) + 1, gx)):
                    for w in range(max(0, int(u[1] - r)), min(math.ceil(u[1] + r) + 1, gy)):
                        for h in range(max(0, int(u[2] - r)), min(math.ceil(u[2] + r) + 1, gz)):
                            d = [u[0] - c, u[1] - w, u[2] - h]
                            if all(abs(x) < r for x in d):
                                pos.append(pm[i, c, w, h, ai, 3 + lm : 4 + lm])
                                neg.append(pm[i, c, w, h, ai, 3 : 3 + lm])
                                neg.append(pm[i, c, w, h, ai, 4 + lm :])
                                reg_p.append(pm[i, c, w, h, ai, :3])
                                reg_t.append(torch.tensor([x / r for x in d]))
    hard = [pm[..., 3 + lm].reshape(-1).topk(n * 256).values for lm, n in enumerate(hard_count) if n]
    pos_t, neg_t = torch.cat(pos), torch.cat(neg)
    loss = F.binary_cross_entropy_with_logits(pos_t, torch.ones_like(pos_t))
    loss = loss + F.binary_cross_entropy_with_logits(neg_t, torch.zeros_like(neg_t)) / (num_l - 1)
    hard_t = torch.cat(hard)
    loss = loss + 0.2 * F.binary_cross_entropy_with_logits(hard_t, torch.zeros_like(hard_t))
    loss = loss + 0.001 * F.binary_cross_entropy_with_logits(pm, torch.zeros_like(pm))
    return loss + F.smooth_l1_loss(torch.tanh(torch.stack(reg_p)), torch.stack(reg_t).to(pm.dtype))


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Output on an 8 x 8 x 4 grid (input 32 x 32 x 16) for 3 landmarks; landmarks 0 and 1 of
    sample 0 share cells (a cell inside two balls), landmark 0 sits at the border, landmark 2 of
    sample 1 is missing."""
    torch.manual_seed(0)
    out = torch.randn(2, 4 * (3 + 3), 8, 8, 4, dtype=torch.float64)
    lm = torch.tensor(
        [
            [[1.0, 2.5, 0.0], [5.0, 3.9, 2.2], [20.3, 17.6, 9.1]],
            [[12.2, 26.9, 13.5], [30.5, 1.5, 6.0], [math.nan, math.nan, math.nan]],
        ],
        dtype=torch.float64,
    )
    return out, lm


def test_authors_loss_equals_the_released_formulas():
    out, lm = _pair()
    head = AnchorHead(8, 3, stride=4, scheme="authors").double()
    torch.testing.assert_close(head.loss(out, lm), authors_loss_reference(out, lm))
    # a cell inside two balls is a positive of both (sample 0, landmarks 0 and 1)
    inside, _ = head.authors_targets(lm, (8, 8, 4))
    assert (inside[0, :, 0] & inside[0, :, 1]).any()
    # fedsim's scheme is a different loss on the same pair
    assert not torch.isclose(AnchorHead(8, 3, stride=4).double().loss(out, lm), head.loss(out, lm))


def test_authors_loss_pieces_by_hand():
    """One landmark at a cell centre (u = 2) of a 4 x 4 x 4 grid, all-zero output: every BCE is
    log 2. Positives: the centre cell for each anchor, and for r = 1.25 its 26 neighbours too (|d| =
    1 < 1.25, but not < 1): 30 proposals, 90 offset values; the r = 1.25 ones have targets in
    {-0.8, 0, 0.8} per axis (54 of the 90 are +-0.8), so SmoothL1(tanh 0 = 0, t) averages
    54 * 0.5 * 0.8^2 / 90 = 0.192. Loss = log 2 (positives) + 0.001 log 2 (whole map) + 0.192."""
    out = torch.zeros(1, 4 * 4, 4, 4, 4, dtype=torch.float64)
    head = AnchorHead(8, 1, stride=4, scheme="authors").double()
    lm = torch.tensor([[[8.0, 8.0, 8.0]]], dtype=torch.float64)  # u = 2 exactly
    inside, _ = head.authors_targets(lm, (4, 4, 4))
    assert inside[0, :, 0].sum(-1).tolist() == [1, 1, 1, 27]
    assert float(head.loss(out, lm)) == pytest.approx(math.log(2) * 1.001 + 0.192)
    out2 = torch.zeros(1, 4 * 5, 4, 4, 4, dtype=torch.float64)
    head2 = AnchorHead(8, 2, stride=4, scheme="authors").double()
    lm2 = torch.tensor([[[8.0, 8.0, 8.0], [math.nan] * 3]], dtype=torch.float64)
    # positives: owner BCE log 2, other landmark BCE log 2 / (L - 1), hard negatives 0.2 log 2
    assert float(head2.loss(out2, lm2)) == pytest.approx(math.log(2) * (1 + 1 + 0.2 + 0.001) + 0.192)
    # offsets: target (u - i) / r at the positives; a constant tanh(o) = 0.5 on a landmark at
    # u = (2.25, 2, 2) gives SmoothL1 (beta 1, mean) of (0.5 - d / r) over the positives' 3 values
    lm3 = torch.tensor([[[9.0, 8.0, 8.0]]], dtype=torch.float64)
    out3 = torch.zeros(1, 4, 4, 4, 4, 4, dtype=torch.float64)
    out3[:, :, :3] = math.atanh(0.5)
    inside, target = head.authors_targets(lm3, (4, 4, 4))
    d = target.permute(0, 1, 2, 4, 3)[inside]  # (P, 3)
    smooth = torch.where((0.5 - d).abs() < 1, 0.5 * (0.5 - d) ** 2, (0.5 - d).abs() - 0.5).mean()
    cls = F.binary_cross_entropy_with_logits(torch.zeros(1), torch.ones(1)).item()  # log 2
    noobj = 0.001 * F.binary_cross_entropy_with_logits(out3, torch.zeros_like(out3)).item()
    assert float(head.loss(out3.view(1, 16, 4, 4, 4), lm3)) == pytest.approx(cls + noobj + float(smooth))
    # x cells: 2 for every anchor, 3 only for r > 0.75 (|2.25 - 3| = 0.75 is not < 0.75), never 1
    # (1.25 is not < 1.25); y and z: cell 2, and 1 and 3 only for r = 1.25: 1, 1, 2, 2 * 3 * 3
    assert inside[0, :, 0].sum(-1).tolist() == [1, 1, 2, 18]


def test_authors_decoding_uses_cell_times_stride_and_the_plain_medoid():
    head = AnchorHead(8, 1, stride=4, topk=3, scheme="authors").double()
    out = torch.full((1, 4 * 4, 4, 4, 4), -10.0, dtype=torch.float64)
    view = out.view(1, 4, 4, 4, 4, 4)
    view[0, :, :3] = 0.0  # offsets 0: positions at cell * 4
    view[0, 0, 3, 1, 1, 1] = 5.0  # three votes: (4, 4, 4), (8, 4, 4), (12, 4, 4) -> medoid (8, 4, 4)
    view[0, 0, 3, 2, 1, 1] = 1.0
    view[0, 0, 3, 3, 1, 1] = 0.0
    assert head.decode(out)[0, 0].tolist() == [8.0, 4.0, 4.0]
    # fedsim's weighted medoid picks the confident vote; its grid centres cells at 4 i + 1.5
    fed = AnchorHead(8, 1, stride=4, topk=3).double()
    assert fed.decode(out)[0, 0].tolist() == [9.5, 5.5, 5.5]


def test_bra_with_the_authors_heads_and_scale_equals_full_attention_with_scale_channels():
    torch.manual_seed(0)
    c = 32
    m = BiLevelRoutingAttention3d(c, c // 8, regions=(2, 2, 2), topk=8, qk_scale=c**-0.5).double()
    x = torch.randn(1, 4, 4, 4, c, dtype=torch.float64)
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    heads = lambda z: z.reshape(1, -1, 4, 8).transpose(1, 2)  # noqa: E731  4 heads of 8 channels
    attn = (heads(q) @ heads(k).transpose(-1, -2) * c**-0.5).softmax(-1)
    ref = (attn @ heads(v)).transpose(1, 2).reshape(1, 4, 4, 4, c)
    ref = m.proj(ref + m.lepe(v.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1))
    torch.testing.assert_close(m(x), ref)


def test_the_authors_attention_scheme_sets_heads_of_8_and_the_channel_scale():
    paper = WIDTHS["paper"].h3de
    authors = paper.with_attention("authors")
    assert [authors.heads(w) for w in paper.widths] == [8, 16, 32, 64]
    assert [paper.heads(w) for w in paper.widths] == [2, 4, 8, 16]
    assert authors.qk_scale(256) == 256**-0.5 and paper.qk_scale(256) is None
    with pytest.raises(ConfigError, match="valid choices: fedsim, authors"):
        paper.with_attention("bert")
    tiny = H3DEBackbone(WIDTHS["tiny"].h3de.with_attention("authors"))
    bra = [blk.attn for stage in tiny.stages for blk in stage]
    assert [(a.num_heads, a.scale) for a in bra] == [(1, 8**-0.5), (2, 16**-0.5), (3, 24**-0.5), (4, 32**-0.5)]
    net = build_model("h3denet", size="tiny", num_landmarks=14, attention="authors", head="authors")
    assert net.head.scheme == "authors" and net.backbone.stages[3][0].attn.scale == 32**-0.5
    # same parameters either way: the schemes change the computation, not the weights
    fed = build_model("h3denet", size="tiny", num_landmarks=14)
    assert {k: v.shape for k, v in fed.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
