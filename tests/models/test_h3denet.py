"""H3DE-Net backbones: shapes in 3D at two sizes, BRA against full / masked attention references,
region clamping and input checks, gradients, paper-width parameter count."""

from __future__ import annotations

import pytest
import torch

from fedsim.models.h3denet import BiLevelRoutingAttention3d, H3DEArch, H3DEBackbone, UNet3DBackbone

TINY = H3DEArch(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1), stem_width=4, head_dim=8)


@pytest.mark.parametrize("size", [(64, 64, 32), (64, 32, 96)])
@pytest.mark.parametrize("in_channels", [1, 2])
def test_backbone_shapes(size, in_channels):
    torch.manual_seed(0)
    x = torch.randn(2, in_channels, *size)
    out = H3DEBackbone(TINY, in_channels=in_channels)(x)
    assert out.shape == (2, 8, *(s // 4 for s in size))
    unet = UNet3DBackbone((4, 8, 16), in_channels=in_channels)
    assert unet(x).shape == (2, 4, *size) and unet.stride == 1 and unet.out_channels == 4


def reference(m: BiLevelRoutingAttention3d, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Plain multi-head self-attention over all tokens with the module's own weights (+ LePE +
    projection); ``allowed`` ``(B, N, N)`` masks key tokens out of each query's softmax."""
    b, *size, c = x.shape
    h, d = m.num_heads, c // m.num_heads
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    heads = lambda z: z.reshape(b, -1, h, d).transpose(1, 2)  # noqa: E731
    logits = heads(q) @ heads(k).transpose(-1, -2) * d**-0.5
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], -torch.inf)
    out = (logits.softmax(-1) @ heads(v)).transpose(1, 2).reshape(b, *size, c)
    return m.proj(out + m.lepe(v.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1))


def test_bra_with_all_regions_equals_full_attention():
    torch.manual_seed(0)
    m = BiLevelRoutingAttention3d(16, 2, regions=(4, 4, 2), topk=32).double()
    x = torch.randn(2, 8, 8, 4, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference(m, x))


def test_bra_with_top_k_equals_attention_masked_to_the_routed_regions():
    """Independent routing: region of every token by its coordinates, region means of q/k from the
    token-level projections, top-k by affinity; full attention masked to those regions."""
    torch.manual_seed(1)
    m = BiLevelRoutingAttention3d(8, 2, regions=(2, 2, 2), topk=3).double()
    x = torch.randn(2, 4, 6, 2, 8, dtype=torch.float64)
    b, X, Y, Z, c = x.shape
    coords = torch.stack(torch.meshgrid(torch.arange(X), torch.arange(Y), torch.arange(Z), indexing="ij"), -1).reshape(-1, 3)
    region = (coords[:, 0] // (X // 2)) * 4 + (coords[:, 1] // (Y // 2)) * 2 + coords[:, 2] // (Z // 2)  # (N,)
    q, k, _ = m.qkv(x).reshape(b, -1, 3 * c).chunk(3, dim=-1)
    onehot = torch.nn.functional.one_hot(region, 8).double()  # (N, 8)
    qr = onehot.T @ q / onehot.sum(0)[:, None]
    kr = onehot.T @ k / onehot.sum(0)[:, None]
    top = (qr @ kr.transpose(1, 2)).topk(3, dim=-1).indices  # (B, 8, 3)
    routed = torch.zeros(b, 8, 8, dtype=torch.bool).scatter_(2, top, True)
    allowed = routed[:, region][:, :, region]  # (B, N, N): query token's region routes to key token's region
    torch.testing.assert_close(m(x), reference(m, x, allowed))
    assert not torch.allclose(m(x), reference(m, x))  # routing really drops regions


def test_region_grid_clamps_to_small_maps_and_rejects_bad_sizes():
    m = BiLevelRoutingAttention3d(8, 1, regions=(4, 4, 2), topk=16)
    assert m.region_grid((16, 8, 4)) == (4, 4, 2)
    assert m.region_grid((2, 2, 1)) == (2, 2, 1)
    assert m.region_grid((6, 3, 3)) == (3, 3, 1)  # the largest count <= 4 (2) that divides the axis
    assert m(torch.randn(1, 2, 2, 1, 8)).shape == (1, 2, 2, 1, 8)  # top-k clamps to the 4 regions
    with pytest.raises(ValueError, match="divisible by 32"):
        H3DEBackbone(TINY)(torch.randn(1, 1, 64, 48, 32))
    with pytest.raises(ValueError, match="larger than 32"):
        H3DEBackbone(TINY)(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="bottom level"):
        UNet3DBackbone((4, 8, 16))(torch.randn(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet3DBackbone((4, 8, 16))(torch.randn(1, 1, 8, 8, 6))
    with pytest.raises(ValueError, match="4 positive values"):
        H3DEArch(widths=(8, 16, 32))


def test_every_parameter_gets_a_gradient_and_forward_is_deterministic():
    torch.manual_seed(0)
    net = H3DEBackbone(TINY)
    x = torch.randn(2, 1, 64, 64, 32)
    out = net(x)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    torch.manual_seed(0)
    assert torch.equal(H3DEBackbone(TINY)(x), out.detach())


def test_paper_widths_parameter_count():
    """Counted by hand, layer by layer (weights + biases; InstanceNorm/LayerNorm affine: 2 per channel)."""
    with torch.device("meta"):
        net = H3DEBackbone(H3DEArch())
        unet = UNet3DBackbone()
    w, d, s = (64, 128, 256, 512), (2, 2, 4, 2), 32
    # block: qkv 3C^2+3C, proj C^2+C, MLP 8C^2+5C, LePE 125C+C, positional 27C+C, two LayerNorms 4C
    blocks = sum(n * (12 * c * c + 167 * c) for c, n in zip(w, d, strict=True))
    stem = (27 * s + s + 2 * s) + (27 * s * w[0] + w[0] + 2 * w[0])
    down = sum(27 * w[i] * w[i + 1] + 3 * w[i + 1] for i in range(3))
    double = lambda ci, co: 27 * ci * co + 3 * co + 27 * co * co + 3 * co  # noqa: E731  (two conv + IN)
    decoder = sum(double(w[i + 1] + w[i], w[i]) for i in range(3))
    assert sum(p.numel() for p in net.parameters()) == blocks + stem + down + 2 * sum(w) + decoder == 24_333_184
    u = (32, 64, 128, 256)
    n_unet = double(1, u[0]) + sum(double(u[i - 1], u[i]) for i in range(1, 4)) + sum(double(u[i + 1] + u[i], u[i]) for i in range(3))
    assert sum(p.numel() for p in unet.parameters()) == n_unet
