"""AI-CNet3D: a small 3D CNN with anatomically-informed cross-attention for OCT glaucoma
classification (Kenia, Li, Srivastava, Thakoor, MELBA 2025, arXiv 2510.00882).

Input: one OCT volume ``(B, 1, D, H, W)``; ``D`` runs superior -> inferior across B-scans, ``H`` is
depth (vitreous -> choroid), ``W`` is lateral (macula half at low ``W``, optic-nerve-head half at
high ``W``). The paper uses ``128 x 192 x 112``.

Backbone (paper section 3, Fig. 2; the authors' public configuration):
Conv3d 1->32 k7 s2 + BN + ReLU; Conv3d 32->32 k5 + BN + ReLU; attention block A1 + MaxPool3d(2);
two Conv3d 32->32 k3 + BN + ReLU; attention block A2 + MaxPool3d(2); Conv3d 32->32 k3 + BN + ReLU
(the Grad-CAM target); global average pooling; Linear 32->2.

Variants (registered in :mod:`fedsim.models` for the ``aicnet3d`` task; build one with
``build_model(name, input_shape=(D, H, W))``):

* ``aicnet3d_hemiretinal`` (default): A1/A2 attend between the superior and inferior halves of ``D``;
* ``aicnet3d_neuronaxon``: between the macula and optic-nerve-head halves of ``W``;
* ``aicnet3d_hemiretinal_neuronaxon``: four quadrants, superior<->inferior within each lateral half
  and macula<->nerve within each hemiretina;
* ``aicnet3d_plain``: the same CNN with the attention blocks removed (max-pool only);
* ``aicnet3d_epa``: UNETR++'s efficient paired attention (EPA) in place of the cross-attention, the
  paper's parameter-count comparison (its spatial branch projects the *token* axis with a
  ``Linear(N, 64)``, so its size grows with the input volume: ~25 M parameters at paper size).

CARE (Channel Attention REpresentation, paper section 3.3) is the channel mean of block A2's
(pooled) output; Grad-CAM uses the last conv layer; both are ReLU'd and divided by their per-sample
maximum, and have the same spatial size (``D/8 x H/8 x W/8``).

Two items exist in the paper's and in the released code's form (AI4VSLab/AI-CNet3D):

* **pooling** (``pooling``): ``global`` (default) is true global average pooling, as the paper's
  text says; ``authors`` is the release's ``nn.AvgPool3d(kernel_size=min(s), stride=s)`` with
  ``s = input_size // 8`` (``model.py``), which on the ``s``-sized last map averages only its
  first ``min(s)``-cube corner: 14 x 14 x 14 of 16 x 24 x 14 at paper size, 51 % of the positions;
* **Grad-CAM target and normalisation** (:func:`gradcam_map`, :func:`care_map`): fedsim
  differentiates the predicted class's *logit* and divides each map by its exact maximum; the
  release differentiates the *softmax probability* (its network ends with a Softmax and the
  backward pass starts from the output) and divides by ``max + 1e-5`` (CARE too). Probability
  gradients are ``p (1 - p)`` times smaller, so at paper size its raw Grad-CAM peaks at 4-10e-6,
  below that eps: the maps then peak well below 1 while CARE peaks at ~1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models.registry import register_model

#: Splits of the attention variants: which anatomical halves attend to each other.
SPLITS = ("hemiretinal", "neuronaxon", "hemiretinal_neuronaxon")


#: The release's normalisation constant: maps are divided by ``max + AUTHORS_EPS``.
AUTHORS_EPS = 1e-5
#: Pooling before the classifier: true global average (the paper's text) or the release's corner.
POOLINGS = ("global", "authors")
#: Grad-CAM target: the predicted class's logit (fedsim) or its softmax probability (the release).
GRADCAM_TARGETS = ("logit", "probability")


def normalise_map(m: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """ReLU, then divide each sample by its maximum (``m``: ``(B, ...)``), so every map peaks at
    exactly 1; all-zero maps stay zero. With ``eps > 0`` the release's ``m / (max + eps)``
    (``model.py``), which leaves maps with a maximum near or below ``eps`` well below 1."""
    m = F.relu(m)
    peak = m.flatten(1).amax(1).view(-1, *([1] * (m.dim() - 1)))
    if eps > 0:
        return m / (peak + eps)
    return m / torch.where(peak > 0, peak, torch.ones_like(peak))


def authors_pool_geometry(input_shape: tuple[int, int, int]) -> tuple[int, tuple[int, int, int]]:
    """The release's ``AvgPool3d`` for an input volume ``(D, H, W)``: kernel ``min(s)`` and
    stride ``s = input // 8`` (``model.py``: ``input_size / 2 ** (2 pools + 1 strided conv)``)."""
    stride = tuple(int(n) // 8 for n in input_shape)
    if min(stride) < 1:
        raise ValueError(f"the authors' pooling needs every input axis >= 8, got {input_shape}")
    return min(stride), stride  # type: ignore[return-value]


class CrossCovarianceAttention(nn.Module):
    """One direction of channel-wise ("cross-covariance", XCA-style) cross-attention.

    Queries come from region ``a``, keys and values from region ``b`` (tokens ``(B, N, C)``, the
    same ``N`` in both: token ``i`` of both regions sits at the same position relative to its
    region). Per head, ``q`` and ``k`` (``d x N``) are L2-normalised along the token axis and
    ``A = softmax(tau_h * q k^T)`` is a ``d x d`` channel-affinity matrix; the output
    ``A v`` has ``N`` tokens, one per *query-region* position, followed by ``Linear(C, C)``.
    Cost is linear in ``N``, which is what keeps the block cheap on 3D volumes.
    """

    def __init__(self, channels: int, heads: int = 4, attn_drop: float = 0.15) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.q = nn.Linear(channels, channels, bias=False)
        self.k = nn.Linear(channels, channels, bias=False)
        self.v = nn.Linear(channels, channels, bias=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(channels, channels)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, h, d, N)
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 3, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"regions must have the same token shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        q = F.normalize(self._heads(self.q(a)), dim=-1)
        k = F.normalize(self._heads(self.k(b)), dim=-1)
        v = self._heads(self.v(b))
        attn = self.attn_drop((q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1))  # (B, h, d, d)
        out = attn @ v  # (B, h, d, N)
        return self.proj(out.permute(0, 3, 1, 2).reshape(a.shape))


def _halves(n: int) -> tuple[slice, slice]:
    """The two halves of an axis of length ``n``; for odd ``n`` both take the middle slice
    (``ceil(n/2)`` each), so the regions have equal shapes and the middle gets their mean."""
    h = (n + 1) // 2
    return slice(0, h), slice(n - h, n)


class AnatomicalCrossAttention(nn.Module):
    """Cross-attention between anatomical regions of a feature volume ``(B, C, D, H, W)``.

    ``split``: ``hemiretinal`` (superior/inferior halves of ``D``), ``neuronaxon`` (macula/nerve
    halves of ``W``) or ``hemiretinal_neuronaxon`` (the four quadrants; each quadrant attends to
    its vertical and its lateral neighbour, and receives the sum of both outputs). Each region's
    tokens get their own LayerNorm; every direction (query region -> key region) has its own
    :class:`CrossCovarianceAttention`. The attended tokens are written back **at the query
    region's own spatial positions**, added through a per-channel scale ``gamma`` (initialised
    1e-6), then ``y + Conv1x1(Dropout3d(y))``.

    Note: the authors' public code concatenates the regions' outputs along the token axis and
    reshapes the result as if it were the whole volume in ``(D, H, W)`` order. That is right for
    the hemiretinal split of ``D`` (the first axis), but for the NeuronAxon variants (a split of
    ``W``) it scatters the tokens to other positions (and the quadrant variant also adds outputs of
    different quadrants together). We put every token back where it came from.
    """

    def __init__(self, channels: int, split: str, heads: int = 4, attn_drop: float = 0.15, drop: float = 0.1) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
        self.split = split
        # regions: (row along D, column along W); 0 = superior / macula, 1 = inferior / nerve
        self.regions: tuple[tuple[int | None, int | None], ...]
        pairs: tuple[tuple[int, int], ...]
        if split == "hemiretinal":
            self.regions = ((0, None), (1, None))
            pairs = ((0, 1), (1, 0))
        elif split == "neuronaxon":
            self.regions = ((None, 0), (None, 1))
            pairs = ((0, 1), (1, 0))
        else:  # quadrants 0 sup-mac, 1 sup-nerve, 2 inf-mac, 3 inf-nerve
            self.regions = ((0, 0), (0, 1), (1, 0), (1, 1))
            pairs = ((0, 2), (2, 0), (1, 3), (3, 1), (0, 1), (1, 0), (2, 3), (3, 2))
        self.pairs = pairs
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in self.regions)
        self.attn = nn.ModuleList(CrossCovarianceAttention(channels, heads, attn_drop) for _ in pairs)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))
        self.conv = nn.Sequential(nn.Dropout3d(drop), nn.Conv3d(channels, channels, 1))

    def region_slices(self, shape: torch.Size | tuple[int, ...]) -> list[tuple[slice, slice]]:
        """``(slice of D, slice of W)`` of every region for a ``(B, C, D, H, W)`` input."""
        d_halves, w_halves = _halves(shape[2]), _halves(shape[4])
        full = slice(None)
        return [(full if r is None else d_halves[r], full if c is None else w_halves[c]) for r, c in self.regions]

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention term (before ``gamma``), each region's output at its own positions."""
        b, c = x.shape[:2]
        slices = self.region_slices(x.shape)
        crops = [x[:, :, sd, :, sw] for sd, sw in slices]
        tokens = [norm(t.flatten(2).transpose(1, 2)) for norm, t in zip(self.norms, crops, strict=True)]
        outs: list[torch.Tensor | None] = [None] * len(slices)
        for (qa, kb), attn in zip(self.pairs, self.attn, strict=True):
            o = attn(tokens[qa], tokens[kb])
            outs[qa] = o if outs[qa] is None else outs[qa] + o
        merged = x.new_zeros(x.shape)
        count = x.new_zeros((1, 1, x.shape[2], 1, x.shape[4]))
        for (sd, sw), crop, o in zip(slices, crops, outs, strict=True):
            assert o is not None
            merged[:, :, sd, :, sw] += o.transpose(1, 2).reshape(b, c, *crop.shape[2:])
            count[:, :, sd, :, sw] += 1
        return merged / count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.gamma.view(1, -1, 1, 1, 1) * self.attend(x)
        return y + self.conv(y)


class EfficientPairedAttention(nn.Module):
    """UNETR++'s EPA block (Shaker et al. 2024) as used in the AI-CNet3D comparison.

    Shared q/k, a channel-attention branch (as above, but self-attention over all tokens) and a
    spatial branch whose keys and values are projected along the *token* axis by one shared
    ``Linear(N, proj)``: ``N = D*H*W`` of the stage, hence tens of millions of parameters at
    paper size. Outputs of both branches are projected to ``C/2`` each and concatenated; then
    ``x + gamma * EPA(LN(x))`` and ``y + Conv1x1(Dropout3d(y))``.
    """

    def __init__(self, channels: int, num_tokens: int, proj: int = 64, heads: int = 4, attn_drop: float = 0.15, drop: float = 0.1) -> None:
        super().__init__()
        self.heads, self.num_tokens = heads, num_tokens
        self.norm = nn.LayerNorm(channels)
        self.qkvv = nn.Linear(channels, 4 * channels, bias=False)
        self.token_proj = nn.Linear(num_tokens, proj)  # E = F in UNETR++
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.temperature2 = nn.Parameter(torch.ones(heads, 1, 1))
        self.drop_ca, self.drop_sa = nn.Dropout(attn_drop), nn.Dropout(attn_drop)
        self.out_sa = nn.Linear(channels, channels // 2)
        self.out_ca = nn.Linear(channels, channels // 2)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))
        self.conv = nn.Sequential(nn.Dropout3d(drop), nn.Conv3d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        n = x[0, 0].numel()
        if n != self.num_tokens:
            raise ValueError(f"EPA block built for {self.num_tokens} tokens got {n} (input volume size changed?)")
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkvv = self.qkvv(self.norm(t)).reshape(b, n, 4, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)
        q, k, v_ca, v_sa = qkvv[0], qkvv[1], qkvv[2], qkvv[3]  # (B, h, d, N)
        k_proj, v_proj = self.token_proj(k), self.token_proj(v_sa)  # (B, h, d, P)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn_ca = self.drop_ca((q @ k.transpose(-2, -1) * self.temperature).softmax(-1))
        x_ca = (attn_ca @ v_ca).permute(0, 3, 1, 2).reshape(b, n, c)
        attn_sa = self.drop_sa((q.transpose(-2, -1) @ k_proj * self.temperature2).softmax(-1))  # (B, h, N, P)
        x_sa = (attn_sa @ v_proj.transpose(-2, -1)).permute(0, 3, 1, 2).reshape(b, n, c)
        epa = torch.cat((self.out_sa(x_sa), self.out_ca(x_ca)), dim=-1)
        y = t + self.gamma * epa
        y = y.transpose(1, 2).reshape(b, c, *spatial)
        return y + self.conv(y)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


def stage_shapes(input_shape: tuple[int, int, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Spatial shapes seen by blocks A1 and A2 for an input volume ``(D, H, W)``."""
    a1 = tuple((s + 1) // 2 for s in input_shape)  # k7 s2 p3 conv
    a2 = tuple(s // 2 for s in a1)
    return a1, a2  # type: ignore[return-value]


@dataclass(frozen=True)
class AICNet3DOutput:
    """Logits ``(B, 2)``, block A2's pooled output (the CARE source) and the last conv's
    pre-BN activations (the Grad-CAM target), both ``(B, C, D/8, H/8, W/8)``."""

    logits: torch.Tensor
    care_features: torch.Tensor
    gradcam_features: torch.Tensor


class AICNet3D(nn.Module):
    """The AI-CNet3D classifier; ``attention`` is one of :data:`SPLITS`, ``"epa"`` or ``None`` (plain).

    ``forward`` returns logits; :meth:`forward_features` also returns the CARE and Grad-CAM sources.
    ``input_shape`` is only needed by the EPA variant (its token projection has a fixed size).
    """

    def __init__(
        self,
        attention: str | None = "hemiretinal",
        channels: int = 32,
        num_classes: int = 2,
        input_shape: tuple[int, int, int] = (128, 192, 112),
        heads: int = 4,
        attn_drop: float = 0.15,
        pooling: str = "global",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid choices: {', '.join(POOLINGS)}")
        self.attention = attention
        self.pooling = pooling
        self.input_shape = tuple(input_shape)
        c = channels
        self.conv1 = _conv(1, c, 7, stride=2)
        self.conv2 = _conv(c, c, 5)
        self.conv3 = _conv(c, c, 3)
        self.conv4 = _conv(c, c, 3)
        self.conv5 = _conv(c, c, 3)  # conv5[0] is the Grad-CAM layer
        self.att1, self.att2 = self._block(attention, c, input_shape, heads, attn_drop)
        self.pool = nn.MaxPool3d(2)
        self.fc = nn.Linear(c, num_classes)

    @staticmethod
    def _block(attention: str | None, c: int, shape: tuple[int, int, int], heads: int, drop: float) -> tuple[nn.Module, nn.Module]:
        if attention is None:
            return nn.Identity(), nn.Identity()
        if attention == "epa":
            a1, a2 = stage_shapes(shape)
            n1, n2 = a1[0] * a1[1] * a1[2], a2[0] * a2[1] * a2[2]
            return EfficientPairedAttention(c, n1, heads=heads, attn_drop=drop), EfficientPairedAttention(
                c, n2, heads=heads, attn_drop=drop
            )
        if attention in SPLITS:
            return AnatomicalCrossAttention(c, attention, heads, drop), AnatomicalCrossAttention(c, attention, heads, drop)
        raise ValueError(f"unknown attention {attention!r}; valid choices: {', '.join(SPLITS)}, epa, None")

    def forward_features(self, x: torch.Tensor) -> AICNet3DOutput:
        x = self.conv2(self.conv1(x))
        x = self.pool(self.att1(x))
        x = self.conv4(self.conv3(x))
        care = self.pool(self.att2(x))
        g = self.conv5[0](care)
        x = self.conv5[2](self.conv5[1](g))
        logits = self.fc(self.pool_features(x))
        return AICNet3DOutput(logits, care, g)

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, d, h, w)`` -> ``(B, C)``: the global average, or with ``pooling="authors"`` the
        release's ``AvgPool3d(min(s), stride=s)`` (:func:`authors_pool_geometry`), which must give
        one value per channel (as the release's ``squeeze`` + ``Linear`` require)."""
        if self.pooling == "global":
            return x.mean(dim=(2, 3, 4))
        k, s = authors_pool_geometry(self.input_shape)  # type: ignore[arg-type]
        pooled = F.avg_pool3d(x, kernel_size=k, stride=s)
        if pooled.shape[2:].numel() != 1:
            raise ValueError(
                f"the authors' pooling (kernel {k}, stride {s}) of a {tuple(x.shape[2:])} map gives {tuple(pooled.shape[2:])} "
                f"values per channel, not 1; build the model with the input_shape it is fed (got {self.input_shape})"
            )
        return pooled.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).logits


def care_map(care_features: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """CARE: channel mean of block A2's output, ReLU, per-sample max normalisation (``eps``: the
    release's ``max + eps``) -> ``(B, d, h, w)``."""
    return normalise_map(care_features.mean(dim=1), eps)


def gradcam_map(
    logits: torch.Tensor,
    features: torch.Tensor,
    target: torch.Tensor | None = None,
    create_graph: bool = False,
    score: str = "logit",
    eps: float = 0.0,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of ``features`` (the last conv layer's output, still in the
    autograd graph) for class ``target`` (default: the predicted class), normalised like CARE.

    Channel weights are the spatial means of d(score_target)/d(features), ``score`` being the
    class ``logit`` (fedsim) or its softmax ``probability`` (the release: its network outputs
    probabilities and ``outputs.backward`` starts from them); the map is the weighted channel sum,
    ReLU'd and divided by its maximum (``+ eps``: the release uses 1e-5). With
    ``create_graph=False`` (the default, as in the authors' hook-based code) the channel weights
    are constants for a later backward pass, while the map stays differentiable through
    ``features``; the forward graph is kept (``retain_graph``) for the classification loss.
    """
    if score not in GRADCAM_TARGETS:
        raise ValueError(f"unknown Grad-CAM score {score!r}; valid choices: {', '.join(GRADCAM_TARGETS)}")
    if target is None:
        target = logits.argmax(1)
    values = logits.softmax(1) if score == "probability" else logits
    chosen = values.gather(1, target.view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(chosen, features, retain_graph=True, create_graph=create_graph)
    weights = grads.mean(dim=(2, 3, 4), keepdim=True)
    return normalise_map((weights * features).sum(dim=1), eps)


def consistency_loss(gradcam: torch.Tensor, care: torch.Tensor) -> torch.Tensor:
    """Stage-2 consistency term: MSE between the Grad-CAM and CARE maps (paper section 3.4)."""
    return F.mse_loss(gradcam, care)


# ---------------------------------------------------------------- registration
#: The variant the ``aicnet3d`` task uses when the user names none.
DEFAULT_MODEL = "aicnet3d_hemiretinal"
#: The paper's volume size ``(D, H, W)``.
PAPER_SHAPE = (128, 192, 112)


def _register(name: str, attention: str | None) -> None:
    def build(input_shape: tuple[int, int, int] = PAPER_SHAPE, channels: int = 32, pooling: str = "global") -> AICNet3D:
        return AICNet3D(attention, channels=channels, input_shape=input_shape, pooling=pooling)

    build.__doc__ = f"AI-CNet3D with attention {attention!r} for volumes ``input_shape`` (D, H, W)."
    register_model(name, tasks=("aicnet3d",))(build)


for _name, _att in (
    ("aicnet3d_hemiretinal", "hemiretinal"),
    ("aicnet3d_neuronaxon", "neuronaxon"),
    ("aicnet3d_hemiretinal_neuronaxon", "hemiretinal_neuronaxon"),
    ("aicnet3d_plain", None),
    ("aicnet3d_epa", "epa"),
):
    _register(_name, _att)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
