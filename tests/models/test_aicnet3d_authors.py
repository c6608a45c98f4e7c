"""AI-CNet3D's ``authors`` items against the released code's definitions: the corner-only
``AvgPool3d`` pooling, the Grad-CAM of the softmax probability computed the release's way (hooks,
``outputs.backward`` from the probabilities), and the ``max + 1e-5`` normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models.aicnet3d import AICNet3D, authors_pool_geometry, care_map, gradcam_map, normalise_map


def _authors_pool(input_size: tuple[int, int, int]) -> nn.AvgPool3d:
    """The release's ``model.py``: ``stride = input_size / 2 ** (2 pools + (2 - 1) strided conv)``
    as int64, ``kernel_size = min(stride)``."""
    stride = (np.array(input_size) / np.power(2, 2 + 0 + 1)).astype(np.int64)
    return nn.AvgPool3d(kernel_size=int(np.min(stride)), stride=tuple(int(s) for s in stride))


def test_the_authors_pooling_averages_the_first_corner_only():
    k, stride = authors_pool_geometry((128, 192, 112))
    assert (k, stride) == (14, (16, 24, 14))
    assert round(k**3 / np.prod(stride), 4) == 0.5104  # the share of the 16 x 24 x 14 map it sees
    torch.manual_seed(0)
    shape = (32, 48, 28)  # last map 4 x 6 x 3: kernel 3, stride (4, 6, 3)
    model = AICNet3D("hemiretinal", input_shape=shape, pooling="authors").eval()
    x = torch.randn(2, 32, 4, 6, 3)
    ref = _authors_pool(shape)(x).squeeze()
    torch.testing.assert_close(model.pool_features(x), ref)
    torch.testing.assert_close(model.pool_features(x), x[:, :, :3, :3, :3].mean(dim=(2, 3, 4)))
    assert not torch.allclose(model.pool_features(x), x.mean(dim=(2, 3, 4)))
    # the whole network: logits = fc(corner mean of the last activation)
    vol = torch.randn(2, 1, *shape)
    out = model.forward_features(vol)
    g = model.conv5[2](model.conv5[1](out.gradcam_features))
    torch.testing.assert_close(out.logits, model.fc(_authors_pool(shape)(g).flatten(1)))
    with pytest.raises(ValueError, match="valid choices: global, authors"):
        AICNet3D(pooling="corner")
    with pytest.raises(ValueError, match=r"gives \(2, 1, 1\) values per channel, not 1"):
        model.pool_features(torch.randn(1, 32, 8, 6, 3))


def test_gradcam_of_the_probability_matches_the_release_hook_procedure():
    torch.manual_seed(0)
    model = AICNet3D("hemiretinal", input_shape=(32, 48, 28)).eval()
    x = torch.randn(3, 1, 32, 48, 28)
    # the release: forward hook keeps conv5's output, backward hook its gradient; outputs are
    # softmax probabilities; backward of a one-hot at the predicted class
    store: dict[str, torch.Tensor] = {}
    h1 = model.conv5[0].register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    h2 = model.conv5[0].register_full_backward_hook(lambda m, gi, go: store.__setitem__("grad", go[0]))
    out = model.forward_features(x)
    probs = out.logits.softmax(1)
    grad_outputs = torch.zeros_like(probs)
    grad_outputs[torch.arange(3), probs.argmax(1)] = 1.0
    probs.backward(gradient=grad_outputs, retain_graph=True)
    h1.remove()
    h2.remove()
    pooled = store["grad"].mean(dim=(2, 3, 4))[:, :, None, None, None]
    heat = F.relu((store["act"] * pooled).sum(1))
    ref = heat / (torch.amax(heat, dim=(1, 2, 3), keepdim=True) + 1e-5)
    ours = gradcam_map(out.logits, out.gradcam_features, score="probability", eps=1e-5)
    assert (ref.flatten(1).amax(1) > 0).all()  # non-trivial maps
    torch.testing.assert_close(ours, ref.detach())
    # fedsim's map (logit, exact max) differs in scale: it peaks at exactly 1
    fed = gradcam_map(out.logits, out.gradcam_features)
    assert torch.allclose(fed.flatten(1).amax(1), torch.ones(3))
    # d p_y = p_y (1 - p_y) d(z_y - z_other): the probability's gradient also involves the other
    # logit, so the two targets give different maps, not just a different scale
    assert not torch.allclose(gradcam_map(out.logits, out.gradcam_features, score="probability"), fed, atol=1e-3)
    assert float(ours.detach().amax()) < 1.0  # the eps keeps the release's maps below 1
    with pytest.raises(ValueError, match="valid choices: logit, probability"):
        gradcam_map(out.logits, out.gradcam_features, score="softmax")


def test_the_release_normalisation_leaves_small_maps_below_one():
    m = torch.tensor([[[[4e-6, -1.0], [2e-6, 0.0]]], [[[2.0, 1.0], [0.0, 0.5]]]])
    got = normalise_map(m, 1e-5)
    torch.testing.assert_close(got[0, 0, 0, 0], torch.tensor(4e-6 / (4e-6 + 1e-5)))  # peaks at 0.29
    torch.testing.assert_close(got[1], m[1] / (2.0 + 1e-5))
    assert got[0, 0, 0, 1] == 0  # ReLU
    care = torch.rand(2, 4, 2, 3, 2)
    torch.testing.assert_close(care_map(care, 1e-5), care.mean(1) / (care.mean(1).flatten(1).amax(1)[:, None, None, None] + 1e-5))
