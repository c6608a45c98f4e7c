"""AI-CNet3D: shapes, token placement, CARE / Grad-CAM, consistency loss, parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.models import build_model, list_models
from fedsim.models.aicnet3d import (
    AnatomicalCrossAttention,
    care_map,
    consistency_loss,
    count_parameters,
    gradcam_map,
    normalise_map,
)

VARIANTS = list_models(task="aicnet3d")
PAPER = (128, 192, 112)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("shape", [(16, 24, 14), (24, 40, 18)])
def test_output_shapes_every_variant_two_sizes(name, shape):
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape).eval()
    out = model.forward_features(torch.randn(2, 1, *shape))
    expected = tuple(((s + 1) // 2) // 2 // 2 for s in shape)  # k7 s2 conv, then two max-pools
    assert out.logits.shape == (2, 2)
    assert out.care_features.shape == (2, 32, *expected)
    assert out.gradcam_features.shape == (2, 32, *expected)
    assert torch.isfinite(out.logits).all()


def test_epa_rejects_another_input_size():
    model = build_model("aicnet3d_epa", input_shape=(16, 24, 14))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randn(1, 1, 24, 40, 18))


def _reference_attend(block: AnatomicalCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: gather each region's tokens with explicit index lists (numpy),
    run the block's own LayerNorms / attention modules, and scatter the outputs to the *query*
    region's voxel coordinates; overlapping voxels (odd sizes) get the mean."""
    _, _, d, h, w = x.shape
    hd, hw = (d + 1) // 2, (w + 1) // 2
    rows = {0: np.arange(0, hd), 1: np.arange(d - hd, d), None: np.arange(d)}
    cols = {0: np.arange(0, hw), 1: np.arange(w - hw, w), None: np.arange(w)}
    coords = []
    for r, col in block.regions:
        dd, hh, ww = np.meshgrid(rows[r], np.arange(h), cols[col], indexing="ij")
        coords.append((dd.ravel(), hh.ravel(), ww.ravel()))
    tokens = [norm(x[:, :, dd, hh, ww].transpose(1, 2)) for norm, (dd, hh, ww) in zip(block.norms, coords, strict=True)]
    out = torch.zeros_like(x)
    count = torch.zeros(d, h, w)
    summed = [torch.zeros_like(t) for t in tokens]
    for (qa, kb), attn in zip(block.pairs, block.attn, strict=True):
        summed[qa] = summed[qa] + attn(tokens[qa], tokens[kb])
    for (dd, hh, ww), s in zip(coords, summed, strict=True):
        for n in range(len(dd)):
            out[:, :, dd[n], hh[n], ww[n]] += s[:, n, :]
            count[dd[n], hh[n], ww[n]] += 1
    return out / count


@pytest.mark.parametrize("split", ["hemiretinal", "neuronaxon", "hemiretinal_neuronaxon"])
@pytest.mark.parametrize("shape", [(4, 3, 6), (5, 2, 7)])  # even and odd split axes
def test_tokens_return_to_their_own_positions(split, shape):
    torch.manual_seed(1)
    block = AnatomicalCrossAttention(8, split, heads=2).eval()
    x = torch.randn(2, 8, *shape)
    with torch.no_grad():
        got = block.attend(x)
        ref = _reference_attend(block, x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the full block: x + gamma * attention, then y + conv1x1(y) (dropout off in eval)
    with torch.no_grad():
        block.gamma.fill_(1.0)
        y = x + ref
        torch.testing.assert_close(block(x), y + block.conv(y), rtol=1e-5, atol=1e-5)


def test_permuted_placement_would_be_caught():
    """The authors' placement (concatenate region outputs along tokens, reshape as the whole
    volume) differs from ours for the NeuronAxon split: the reference test above catches it."""
    torch.manual_seed(2)
    block = AnatomicalCrossAttention(8, "neuronaxon", heads=2).eval()
    x = torch.randn(1, 8, 4, 3, 6)
    with torch.no_grad():
        ours = block.attend(x)
        b, c, d, h, w = x.shape
        crops = [x[..., :3], x[..., 3:]]
        toks = [n(t.flatten(2).transpose(1, 2)) for n, t in zip(block.norms, crops, strict=True)]
        outs = [block.attn[0](toks[0], toks[1]), block.attn[1](toks[1], toks[0])]
        permuted = torch.cat(outs, dim=1).reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)
    assert not torch.allclose(ours, permuted, atol=1e-4)


def test_attention_output_follows_its_query_region():
    """Make the direction superior <- inferior output a constant (zero projection weight, bias 5):
    the constant must land exactly on the superior voxels, nowhere else."""
    torch.manual_seed(3)
    block = AnatomicalCrossAttention(8, "hemiretinal", heads=2).eval()
    with torch.no_grad():
        block.attn[0].proj.weight.zero_()  # direction superior <- inferior outputs only its bias
        block.attn[0].proj.bias.fill_(5.0)
        out = block.attend(torch.randn(1, 8, 4, 3, 6))
    assert torch.allclose(out[:, :, :2], torch.full_like(out[:, :, :2], 5.0))  # superior positions
    assert not torch.allclose(out[:, :, 2:], torch.full_like(out[:, :, 2:], 5.0))


def test_normalise_map_relu_and_per_sample_max():
    m = torch.tensor([[[-1.0, 2.0], [4.0, 0.0]], [[-3.0, -1.0], [-2.0, -5.0]]])
    n = normalise_map(m)
    torch.testing.assert_close(n[0], torch.tensor([[0.0, 0.5], [1.0, 0.0]]))
    assert torch.equal(n[1], torch.zeros(2, 2))  # all negative -> zero map


@pytest.mark.parametrize("name", ["aicnet3d_hemiretinal", "aicnet3d_plain"])
def test_care_and_gradcam_shapes_and_normalisation(name):
    torch.manual_seed(4)
    shape = (16, 24, 14)
    model = build_model(name, input_shape=shape).eval()
    out = model.forward_features(torch.randn(3, 1, *shape))
    care = care_map(out.care_features)
    gcam = gradcam_map(out.logits, out.gradcam_features)
    assert care.shape == gcam.shape == (3, *out.care_features.shape[2:])
    for m in (care, gcam):
        assert (m >= 0).all()
        peak = m.flatten(1).amax(1)
        assert all(p == 0 or abs(p - 1) < 1e-6 for p in peak.tolist())  # 0 only for an all-zero map
    assert care.flatten(1).amax(1).gt(0).all()
    # CARE is the channel mean; Grad-CAM weights the channels by the mean gradient
    torch.testing.assert_close(care, normalise_map(out.care_features.mean(1)))
    target = out.logits.argmax(1)
    g = torch.autograd.grad(out.logits.gather(1, target[:, None]).sum(), out.gradcam_features, retain_graph=True)[0]
    ref = normalise_map((g.mean((2, 3, 4), keepdim=True) * out.gradcam_features).sum(1))
    torch.testing.assert_close(gcam, ref)
    # an untrained net may have an all-negative Grad-CAM; with a class weight vector of ones every
    # channel counts positively, so the map is nonzero and must peak at exactly 1
    with torch.no_grad():
        model.fc.weight[1].fill_(1.0)
    out = model.forward_features(torch.randn(3, 1, *shape))
    peak = gradcam_map(out.logits, out.gradcam_features, torch.ones(3, dtype=torch.long)).flatten(1).amax(1)
    torch.testing.assert_close(peak, torch.ones(3))


def test_consistency_loss_zero_when_maps_agree_and_decreases():
    torch.manual_seed(5)
    shape = (16, 24, 14)
    a = torch.rand(2, 2, 3, 1)
    assert consistency_loss(a, a.clone()).item() == 0.0
    model = build_model("aicnet3d_hemiretinal", input_shape=shape)
    model.eval()  # fixed batch, deterministic (no dropout, fixed BN statistics)
    x = torch.randn(2, 1, *shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        out = model.forward_features(x)
        loss = consistency_loss(gradcam_map(out.logits, out.gradcam_features), care_map(out.care_features))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _params(name: str, shape=PAPER) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(name, input_shape=shape))


def test_parameter_counts():
    plain = _params("aicnet3d_plain")
    # independent count of the plain CNN: convs (k7, k5, 3 x k3) + 5 BN + Linear(32, 2)
    convs = (343 * 1 + 125 * 32 + 3 * 27 * 32) * 32 + 5 * 32
    assert plain == convs + 5 * 64 + 66
    hemi = _params("aicnet3d_hemiretinal")
    assert abs(hemi - 240_000) < 5_000  # the paper's "about 0.24 M"
    for name in ("aicnet3d_hemiretinal", "aicnet3d_neuronaxon"):
        assert _params(name) < 1.10 * plain
    # the quadrant variant has 8 attention directions per block (as the authors' code): +31 %
    assert _params("aicnet3d_hemiretinal_neuronaxon") < 1.35 * plain
    epa = _params("aicnet3d_epa")
    assert epa > 50 * plain and epa > 50 * hemi
    assert abs(epa - 25e6) < 1e6  # "about 25 M" in the paper
    # the EPA token projections: Linear(64*96*56, 64) + Linear(32*48*28, 64)
    assert epa - plain > (64 * 96 * 56 + 32 * 48 * 28) * 64
