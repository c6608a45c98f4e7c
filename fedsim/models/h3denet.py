"""H3DE-Net backbones: a CNN stem + bi-level routing attention (BRA) encoder with a multi-scale
convolutional decoder, and a plain 3D U-Net baseline (H3DE-Net, arXiv 2502.14221).

Both return a feature map for a landmark head (:mod:`fedsim.models.landmark_heads`):
``H3DEBackbone`` at stride 4 with ``widths[0]`` channels, ``UNet3DBackbone`` at full resolution.

**Bi-level routing attention** (BiFormer, Zhu et al., CVPR 2023, extended to 3D as in H3DE-Net):
the feature map is split into a grid of regions (4 x 4 x 2, fewer on an axis that is too short or
not divisible); region-level queries and keys are the
means of the token-level ones; the region affinity ``q_r k_r^T`` picks, for every query region,
its top-k key regions; the query tokens of a region then attend (multi-head, token level) only to
the tokens of those k regions. A local positional term (LePE, a depthwise 5x5x5 convolution of
``v``) is added and the result projected by ``Linear(C, C)``. With ``top-k`` = the number of
regions this is exactly full multi-head self-attention (+ LePE + projection); small ``k`` makes the
cost grow with ``k`` instead of the number of regions.

**Heads and scale** (:data:`ATTENTION_SCHEMES`): ``fedsim`` (the default) uses heads of
``H3DEArch.head_dim`` channels (32 at the paper widths) and the usual ``head_dim ** -0.5`` scale;
``authors`` is the released code (``models/BiFormer/bra_legacy.py`` as configured by
``models/PBiFormer_Unet.py``): heads of 8 channels (8/16/32/64 heads at the paper widths) and the
scale ``channels ** -0.5`` (``qk_dim ** -0.5`` with ``qk_dim = dim``), so each head's logits are
``sqrt(heads)`` times flatter than with a per-head scale.

The three landmark models registered for the ``h3denet`` task combine them with a head:
``h3denet`` (anchor-ball head), ``h3denet_heatmap`` (heatmap head, the paper's baseline head) and
``unet3d``; widths come from :data:`WIDTHS` by ``size``. Build one with
``fedsim.models.build_model(name, size="tiny", num_landmarks=14)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.config import ConfigError
from fedsim.data.synthetic_ct import NUM_LANDMARKS
from fedsim.models.landmark_heads import AnchorHead, HeatmapHead, LandmarkNet
from fedsim.models.registry import register_model


class BiLevelRoutingAttention3d(nn.Module):
    """BRA on channels-last tokens ``(B, X, Y, Z, C)`` (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        regions: tuple[int, int, int] = (4, 4, 2),
        topk: int = 4,
        lepe_kernel: int = 5,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if len(regions) != 3 or min(regions) < 1 or topk < 1:
            raise ValueError(f"regions must be three positive counts and topk >= 1, got {regions} and {topk}")
        self.dim, self.num_heads, self.regions, self.topk = dim, num_heads, tuple(regions), topk
        # the attention-logit scale: head_dim ** -0.5 unless given (the authors: dim ** -0.5)
        self.scale = (dim // num_heads) ** -0.5 if qk_scale is None else float(qk_scale)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lepe = nn.Conv3d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def region_grid(self, size: tuple[int, int, int]) -> tuple[int, int, int]:
        """Regions per axis for a feature map of ``size``: the largest count ``<= regions_i`` that
        divides ``size_i`` (``regions_i`` itself whenever it divides, as at the paper's input size;
        smaller maps, e.g. deep stages of small crops, get fewer, equal regions)."""
        return tuple(max(n for n in range(1, min(r, s) + 1) if s % n == 0) for r, s in zip(self.regions, size, strict=True))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *size, c = x.shape
        g = self.region_grid(tuple(size))  # type: ignore[arg-type]
        t = [s // n for s, n in zip(size, g, strict=True)]  # region size
        n_r, n_t = g[0] * g[1] * g[2], t[0] * t[1] * t[2]
        k = min(self.topk, n_r)
        q, kk, v = self.qkv(x).chunk(3, dim=-1)

        def regions(z: torch.Tensor) -> torch.Tensor:  # (B, X, Y, Z, C) -> (B, nR, nT, C)
            z = z.reshape(b, g[0], t[0], g[1], t[1], g[2], t[2], c).permute(0, 1, 3, 5, 2, 4, 6, 7)
            return z.reshape(b, n_r, n_t, c)

        qr, kr, vr = regions(q), regions(kk), regions(v)
        affinity = qr.mean(2) @ kr.mean(2).transpose(1, 2)  # (B, nR, nR)
        idx = affinity.topk(k, dim=-1).indices  # (B, nR, k); the choice itself is not differentiated

        def gather(z: torch.Tensor) -> torch.Tensor:  # (B, nR, nT, C) -> (B, nR, k * nT, C)
            sel = idx[:, :, :, None, None].expand(b, n_r, k, n_t, c)
            return torch.gather(z[:, None].expand(b, n_r, n_r, n_t, c), 2, sel).reshape(b, n_r, k * n_t, c)

        h, d = self.num_heads, c // self.num_heads
        heads = lambda z: z.reshape(*z.shape[:3], h, d).transpose(2, 3)  # noqa: E731  (B, nR, h, n, d)
        attn = (heads(qr) * self.scale) @ heads(gather(kr)).transpose(-1, -2)
        out = attn.softmax(-1) @ heads(gather(vr))  # (B, nR, h, nT, d)
        out = out.transpose(2, 3).reshape(b, g[0], g[1], g[2], t[0], t[1], t[2], c)
        out = out.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, *size, c)
        lepe = self.lepe(v.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        return self.proj(out + lepe)


class H3DEBlock(nn.Module):
    """``x += DWConv3d(x)`` (positional encoding); ``x += BRA(LN(x))``; ``x += MLP(LN(x))``; channels-last."""

    def __init__(
        self, dim: int, num_heads: int, topk: int, regions: tuple[int, int, int], mlp_ratio: int, qk_scale: float | None = None
    ) -> None:
        super().__init__()
        self.pos = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = BiLevelRoutingAttention3d(dim, num_heads, regions, topk, qk_scale=qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class H3DEArch:
    """Encoder widths/depths per stage, BRA top-k per stage, region grid, heads of ``head_dim``
    channels and the attention scale (``"head"``: ``head_dim ** -0.5``; ``"channels"``: the
    authors' ``width ** -0.5``); defaults are the paper's widths with fedsim's heads and scale."""

    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    depths: tuple[int, int, int, int] = (2, 2, 4, 2)
    topk: tuple[int, int, int, int] = (1, 4, 16, 16)
    regions: tuple[int, int, int] = (4, 4, 2)
    stem_width: int = 32
    mlp_ratio: int = 4
    head_dim: int = 32
    scale: str = "head"

    def __post_init__(self) -> None:
        if self.scale not in ("head", "channels"):
            raise ValueError(f"unknown attention scale {self.scale!r}; valid choices: head, channels")
        for name in ("widths", "depths", "topk"):
            v = getattr(self, name)
            if len(v) != 4 or min(v) < 1:
                raise ValueError(f"{name} must be 4 positive values (one per stage), got {v}")
        if len(self.regions) != 3 or min(self.regions) < 1:
            raise ValueError(f"regions must be 3 positive counts, got {self.regions}")
        if min(self.stem_width, self.mlp_ratio, self.head_dim) < 1:
            raise ValueError("stem_width, mlp_ratio and head_dim must be >= 1")

    def heads(self, width: int) -> int:
        n = max(1, width // self.head_dim)
        while width % n:
            n -= 1
        return n

    def qk_scale(self, width: int) -> float | None:
        """The BRA scale of a stage of ``width`` channels (``None``: per head, ``head_dim ** -0.5``)."""
        return width**-0.5 if self.scale == "channels" else None

    def with_attention(self, scheme: str) -> H3DEArch:
        """These widths with the heads and scale of ``scheme`` (:data:`ATTENTION_SCHEMES`):
        ``fedsim`` keeps them, ``authors`` sets heads of 8 channels and the ``width ** -0.5`` scale."""
        if scheme not in ATTENTION_SCHEMES:
            raise ConfigError(f"unknown attention scheme {scheme!r}; valid choices: {', '.join(ATTENTION_SCHEMES)}")
        return self if scheme == "fedsim" else replace(self, head_dim=AUTHORS_HEAD_DIM, scale="channels")


#: Heads and scale of the BRA: fedsim's (``H3DEArch.head_dim``, per-head scale) or the authors'.
ATTENTION_SCHEMES = ("fedsim", "authors")
#: The released code's head size (``models/PBiFormer_Unet.py``: 8/16/32/64 heads at 64-512 channels).
AUTHORS_HEAD_DIM = 8


def _conv_norm(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.InstanceNorm3d(cout, affine=True)]


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    """Two ``Conv3d k3 + InstanceNorm + LeakyReLU``."""
    return nn.Sequential(*_conv_norm(cin, cout), nn.LeakyReLU(0.01), *_conv_norm(cout, cout), nn.LeakyReLU(0.01))


def _check_divisible(x: torch.Tensor, factor: int, what: str) -> None:
    size = tuple(x.shape[2:])
    if len(size) != 3 or any(s % factor for s in size):
        raise ValueError(f"{what} needs a 3D input (B, C, X, Y, Z) with every size divisible by {factor}; got {tuple(x.shape)}")


class H3DEBackbone(nn.Module):
    """H3DE-Net's hybrid encoder (CNN stem, four BRA stages) and multi-scale decoder.

    ``(B, in_channels, X, Y, Z) -> (B, widths[0], X/4, Y/4, Z/4)``; sizes must be divisible by 32
    and larger than 32 on at least one axis (the stride-32 map needs two voxels for InstanceNorm).
    """

    stride = 4

    def __init__(self, arch: H3DEArch | None = None, in_channels: int = 1) -> None:
        super().__init__()
        a = arch or H3DEArch()
        w = a.widths
        self.out_channels = w[0]
        self.stem = nn.Sequential(*_conv_norm(in_channels, a.stem_width, 2), nn.GELU(), *_conv_norm(a.stem_width, w[0], 2))
        self.downsample = nn.ModuleList(nn.Sequential(*_conv_norm(w[i], w[i + 1], 2)) for i in range(3))
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(H3DEBlock(w[i], a.heads(w[i]), a.topk[i], a.regions, a.mlp_ratio, a.qk_scale(w[i])) for _ in range(a.depths[i]))
            )
            for i in range(4)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(w[i]) for i in range(4))
        self.decoder = nn.ModuleList(_double_conv(w[i + 1] + w[i], w[i]) for i in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_divisible(x, 32, "H3DEBackbone")
        if x.shape[2:].numel() < 2 * 32**3:
            raise ValueError(
                f"H3DEBackbone needs more than one voxel at stride 32 (InstanceNorm): an input larger than 32 on "
                f"some axis, e.g. 64 x 64 x 32; got {tuple(x.shape[2:])}"
            )
        x = self.stem(x)
        skips = []
        for i in range(4):
            if i:
                x = self.downsample[i - 1](x)
            x = self.norms[i](self.stages[i](x.permute(0, 2, 3, 4, 1))).permute(0, 4, 1, 2, 3)
            skips.append(x)
        for i in (2, 1, 0):  # stride 32 -> 16 -> 8 -> 4
            up = F.interpolate(x, size=skips[i].shape[2:], mode="trilinear", align_corners=False)
            x = self.decoder[i](torch.cat([up, skips[i]], 1))
        return x


class UNet3DBackbone(nn.Module):
    """A plain 3D U-Net (the paper's UNet3D baseline): per level two ``Conv3d k3 + InstanceNorm +
    LeakyReLU``, max-pooling down, trilinear upsampling + concatenation up. Full-resolution output
    ``(B, widths[0], X, Y, Z)``; sizes must be divisible by ``2 ** (len(widths) - 1)``."""

    # Not MONAI's BasicUNet/UNet: other blocks (dropout, transposed-conv or residual strided units), so other parameters and results.
    stride = 1

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), in_channels: int = 1) -> None:
        super().__init__()
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"widths must be >= 2 positive values (one per level), got {widths}")
        self.widths = tuple(widths)
        self.out_channels = widths[0]
        self.down = nn.ModuleList(_double_conv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(len(widths)))
        self.up = nn.ModuleList(_double_conv(widths[i + 1] + widths[i], widths[i]) for i in range(len(widths) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 ** (len(self.widths) - 1)
        _check_divisible(x, f, "UNet3DBackbone")
        if x.shape[2:].numel() < 2 * f**3:
            raise ValueError(f"UNet3DBackbone needs more than one voxel at its bottom level (InstanceNorm); got {tuple(x.shape[2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool3d(x, 2) if i else x)
            skips.append(x)
        for i in range(len(self.up) - 1, -1, -1):
            up = F.interpolate(x, size=skips[i].shape[2:], mode="trilinear", align_corners=False)
            x = self.up[i](torch.cat([up, skips[i]], 1))
        return x


# ---------------------------------------------------------------- registration
@dataclass(frozen=True)
class LandmarkWidths:
    """Network widths of one size: the H3DE encoder and the U-Net baseline's levels."""

    h3de: H3DEArch
    unet: tuple[int, ...]


#: Widths per ``size`` (the ``h3denet`` task passes its profile): narrow for ``tiny`` and
#: ``quick`` (CPU), the paper's for ``paper``.
WIDTHS: dict[str, LandmarkWidths] = {
    "tiny": LandmarkWidths(H3DEArch(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1), stem_width=4, head_dim=8), (4, 8, 16, 32)),
    "quick": LandmarkWidths(H3DEArch(widths=(16, 32, 64, 128), depths=(1, 1, 2, 1), stem_width=8, head_dim=16), (8, 16, 32, 64)),
    "paper": LandmarkWidths(H3DEArch(), (32, 64, 128, 256)),
}


def landmark_widths(size: str) -> LandmarkWidths:
    """The widths of ``size`` (a key of :data:`WIDTHS`); an unknown size lists the valid ones."""
    if size not in WIDTHS:
        raise ConfigError(f"unknown size {size!r} for the landmark models; valid choices: {', '.join(WIDTHS)}")
    return WIDTHS[size]


@register_model("h3denet", tasks=("h3denet",))
def build_h3denet(size: str = "paper", num_landmarks: int = NUM_LANDMARKS, attention: str = "fedsim", head: str = "fedsim") -> LandmarkNet:
    """H3DE-Net: the BRA encoder + multi-scale decoder with the anchor-ball head; ``attention``
    and ``head`` pick fedsim's or the authors' heads/scale and targets/loss/decoding."""
    backbone = H3DEBackbone(landmark_widths(size).h3de.with_attention(attention))
    return LandmarkNet(backbone, AnchorHead(backbone.out_channels, num_landmarks, stride=backbone.stride, scheme=head))


@register_model("h3denet_heatmap", tasks=("h3denet",))
def build_h3denet_heatmap(
    size: str = "paper", num_landmarks: int = NUM_LANDMARKS, attention: str = "fedsim", head: str = "fedsim"
) -> LandmarkNet:
    """The H3DE-Net backbone with the heatmap head (the paper's baseline head); ``head`` is
    accepted for a uniform task config and has no effect on the heatmap head."""
    backbone = H3DEBackbone(landmark_widths(size).h3de.with_attention(attention))
    return LandmarkNet(backbone, HeatmapHead(backbone.out_channels, num_landmarks, stride=backbone.stride))


@register_model("unet3d", tasks=("h3denet",))
def build_unet3d(size: str = "paper", num_landmarks: int = NUM_LANDMARKS, attention: str = "fedsim", head: str = "fedsim") -> LandmarkNet:
    """A plain 3D U-Net with the heatmap head at full resolution (the paper's UNet3D baseline);
    ``attention`` and ``head`` are accepted for a uniform task config and have no effect."""
    backbone = UNet3DBackbone(landmark_widths(size).unet)
    return LandmarkNet(backbone, HeatmapHead(backbone.out_channels, num_landmarks, stride=backbone.stride))


__all__ = [
    "ATTENTION_SCHEMES",
    "AUTHORS_HEAD_DIM",
    "WIDTHS",
    "BiLevelRoutingAttention3d",
    "H3DEArch",
    "H3DEBackbone",
    "H3DEBlock",
    "LandmarkWidths",
    "UNet3DBackbone",
    "build_h3denet",
    "build_h3denet_heatmap",
    "build_unet3d",
    "landmark_widths",
]
