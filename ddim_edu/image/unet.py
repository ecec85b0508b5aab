"""The DDPM ε-network for images: a UNet with residual blocks, self-attention and a time embedding.

``UNet(UNetConfig())`` is the CIFAR-10 model of Ho et al. (2020) that DDIM samples from
(35.7M parameters): 128 base channels, multipliers (1, 2, 2, 2) for the resolutions 32, 16, 8, 4,
two residual blocks per resolution, self-attention at 16×16 and in the middle, dropout 0.1.
It follows the model contract of the library: ``model(x, t) -> ε`` with x [B, C, H, W] and t a
float tensor [B] of timestep indices in [0, T-1] (index i ↔ ᾱ_i, as in pretrained DDPM weights).
Smaller variants are one line: ``UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2),
attention_resolutions=(8,), norm_groups=8)``.

Parameter names follow the DDPM code (``temb.dense``, ``down[i].block[j]``, ``down[i].attn[j]``,
``mid.block_1``, ``up[i]`` indexed by resolution level, ``nin_shortcut``, ...), so a state dict can
be read side by side with it; :mod:`ddim_edu.image.pretrained` maps diffusers' ``UNet2DModel`` names
onto these. Every numerical detail matches diffusers' ``UNet2DModel`` with the config of
``google/ddpm-cifar10-32`` (``flip_sin_to_cos=False``, ``freq_shift=1``, ``downsample_padding=0``,
``norm_eps=1e-6``, one attention head), which in turn matches the original TensorFlow model.

References:
- J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020, Appendix B
  (architecture), and its code github.com/hojonathanho/diffusion (``diffusion_tf/models/unet.py``).
- The PyTorch ports of that code: pesser/pytorch_diffusion and ermongroup/ddim (``models/diffusion.py``),
  whose checkpoints use the parameter names above.
- O. Ronneberger et al., "U-Net", 2015; T. Salimans et al., "PixelCNN++", 2017 (the backbone DDPM adapts);
  K. He et al., "Identity Mappings in Deep Residual Networks", 2016 (pre-activation residual blocks);
  Y. Wu, K. He, "Group Normalization", 2018; A. Vaswani et al., "Attention Is All You Need", 2017
  (sinusoidal position embedding, scaled dot-product attention).
- diffusers' ``UNet2DModel`` (models/unets/unet_2d.py), the layout of the published checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import batch_times

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]


@dataclass
class UNetConfig:
    image_size: int = 32  # H = W of the training images; it places the attention layers
    in_channels: int = 3  # image channels; ε has the same number
    base_channels: int = 128  # channels at full resolution ("ch" in the DDPM code)
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # one level per entry, channels = base * mult; ×1/2 resolution between levels
    num_res_blocks: int = 2  # residual blocks per level on the way down (the way up has one more)
    attention_resolutions: tuple[int, ...] = (16,)  # resolutions (H) whose blocks are each followed by self-attention
    dropout: float = 0.1  # in every residual block, before its second convolution (0.1 for CIFAR-10)
    norm_groups: int = 32  # GroupNorm groups; every channel count must be divisible by it
    norm_eps: float = 1e-6  # GroupNorm ε (TensorFlow's default, kept by diffusers' DDPM configs)
    attention_head_dim: int | None = None  # None: one head over all channels (DDPM); diffusers' own default is 8
    flip_sin_to_cos: bool = False  # time embedding [sin, cos] (DDPM) or [cos, sin]
    freq_shift: float = 1.0  # frequencies 10000^(-k / (half - freq_shift)), k < half; DDPM: 1

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        for name in ("image_size", "in_channels", "base_channels", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be an int >= 1, got {self.num_res_blocks!r}")
        if not self.channel_mult or not all(isinstance(m, int) and m >= 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult!r}")
        if self.image_size % 2 ** (self.num_levels - 1):
            raise ValueError(
                f"image_size must be divisible by 2^(levels-1) = {2 ** (self.num_levels - 1)}, got {self.image_size}"
            )
        bad = [r for r in self.attention_resolutions if r not in self.resolutions]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not among the levels' resolutions {self.resolutions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        for c in sorted({self.base_channels * m for m in self.channel_mult}):
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} is not divisible by norm_groups={self.norm_groups}")
            if self.attention_head_dim is not None and c % self.attention_head_dim:
                raise ValueError(f"channel count {c} is not divisible by attention_head_dim={self.attention_head_dim}")
        if self.base_channels % 2 or self.base_channels // 2 <= self.freq_shift:
            raise ValueError(
                f"the time embedding needs an even base_channels with base_channels/2 > freq_shift, "
                f"got {self.base_channels} and {self.freq_shift}"
            )

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The feature-map size H at each level: image_size, image_size/2, ..."""
        return tuple(self.image_size // 2**i for i in range(self.num_levels))

    @property
    def temb_channels(self) -> int:
        return 4 * self.base_channels  # DDPM: the time embedding is 4× the base width


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                       max_period: float = 10000.0) -> Tensor:
    """DDPM's sinusoidal embedding of (fractional) timesteps: ``[sin(t ω_k), cos(t ω_k)]``, ``ω_k = max_period^(-k/(half - freq_shift))``.

    ``k = 0..half-1`` with ``half = dim // 2`` (Vaswani et al. 2017, Sec. 3.5, with DDPM's
    ``half - 1`` denominator when ``freq_shift = 1``, so the lowest frequency is exactly
    1/max_period). ``flip_sin_to_cos`` puts the cosines first. Computed in float32, as the
    original model and diffusers do: t [B] -> [B, dim].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # [B, dim]


class TimeEmbedding(nn.Module):
    """t [B] -> sinusoids [B, ch] -> Linear -> SiLU -> Linear -> [B, 4ch], shared by all residual blocks."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch, temb_ch = config.base_channels, config.temb_channels
        self.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])

    def forward(self, t: Tensor) -> Tensor:
        c = self.config
        emb = timestep_embedding(t, c.base_channels, c.flip_sin_to_cos, c.freq_shift)
        emb = emb.to(self.dense[0].weight.dtype)
        return self.dense[1](F.silu(self.dense[0](emb)))  # [B, 4ch]


class ResnetBlock(nn.Module):
    """Pre-activation residual block with the time embedding added between the two convolutions.

    ``h = conv1(SiLU(GN(x))) + W SiLU(temb)``, ``h = conv2(dropout(SiLU(GN(h))))``, output
    ``shortcut(x) + h``; the shortcut is a 1×1 convolution ("network in network") when the
    channel count changes, else the identity.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, out, H, W]
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # the same shift at every pixel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Self-attention over the H·W positions, with a residual connection: ``x + proj_out(softmax(q kᵀ/√d) v)``.

    q, k, v and proj_out are per-pixel linear maps of the group-normalised features (the DDPM code
    writes them as 1×1 convolutions, the same map). One head over all C channels by default;
    with ``head_dim`` the channels are split into C/head_dim heads (scale 1/√head_dim).
    """

    def __init__(self, ch: int, groups: int, eps: float, head_dim: int | None = None):
        super().__init__()
        self.heads = 1 if head_dim is None else ch // head_dim
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C): one token per pixel
        heads = lambda z: z.reshape(B, H * W, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, HW, hd)
        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / sqrt(hd)) v, (B, nh, HW, hd)
        h = self.proj_out(h.transpose(1, 2).reshape(B, H * W, C))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """3×3 convolution with stride 2, padded by one row and column at the bottom and right only
    (TensorFlow's "SAME" padding for an even input), H -> H/2."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 convolution, H -> 2H."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the UNet: residual blocks ``block[j]``, each followed by ``attn[j]`` if the
    level has attention, then an optional ``downsample`` (down path) or ``upsample`` (up path)."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock],
                 downsample: Downsample | None = None, upsample: Upsample | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.downsample = downsample
        self.upsample = upsample


class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution: residual block, self-attention, residual block."""

    def __init__(self, ch: int, config: UNetConfig):
        super().__init__()
        c = config
        self.block_1 = ResnetBlock(ch, ch, c.temb_channels, c.dropout, c.norm_groups, c.norm_eps)
        self.attn_1 = AttnBlock(ch, c.norm_groups, c.norm_eps, c.attention_head_dim)
        self.block_2 = ResnetBlock(ch, ch, c.temb_channels, c.dropout, c.norm_groups, c.norm_eps)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h, temb)), temb)


class UNet(nn.Module):
    """The DDPM UNet ε_θ(x, t) (Ho et al. 2020, Appendix B), configured by :class:`UNetConfig`.

    Down path: ``conv_in``, then per level ``num_res_blocks`` residual blocks (+ attention) and a
    stride-2 convolution (not after the last level); every intermediate output is kept for a skip
    connection. Middle: block, attention, block. Up path, from the lowest resolution: per level
    ``num_res_blocks + 1`` blocks, each taking the concatenation of the current features and the
    most recent skip, then nearest-neighbour upsampling. Output: GroupNorm, SiLU, ``conv_out``.
    ``up[i]`` is the up-path level at resolution ``i`` (as in the DDPM code), so it runs in reverse.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        c = self.config = UNetConfig() if config is None else config
        ch, groups, eps = c.base_channels, c.norm_groups, c.norm_eps
        res_block = lambda i, o: ResnetBlock(i, o, c.temb_channels, c.dropout, groups, eps)
        attn_block = lambda o: AttnBlock(o, groups, eps, c.attention_head_dim)
        widths = [ch * m for m in c.channel_mult]  # channels per level

        self.temb = TimeEmbedding(c)
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        # Down path: record the channel count of every skip connection it produces.
        skips = [ch]
        self.down = nn.ModuleList()
        cur = ch
        for i, out in enumerate(widths):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(res_block(cur, out))
                cur = out
                if c.resolutions[i] in c.attention_resolutions:
                    attns.append(attn_block(out))
                skips.append(cur)
            last = i == c.num_levels - 1
            self.down.append(Level(blocks, attns, downsample=None if last else Downsample(cur)))
            if not last:
                skips.append(cur)

        self.mid = MidBlock(cur, c)

        # Up path, built from the lowest resolution, consuming the skips in reverse order.
        up = []
        for i in reversed(range(c.num_levels)):
            out = widths[i]
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(res_block(cur + skips.pop(), out))
                cur = out
                if c.resolutions[i] in c.attention_resolutions:
                    attns.append(attn_block(out))
            up.insert(0, Level(blocks, attns, upsample=Upsample(cur) if i > 0 else None))
        self.up = nn.ModuleList(up)
        assert not skips

        self.norm_out = nn.GroupNorm(groups, cur, eps=eps)
        self.conv_out = nn.Conv2d(cur, c.in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """ε_θ(x, t) for x [B, C, H, W] and timestep indices t [B] (a scalar is used for the whole batch).

        The network runs in its parameters' dtype (``.double()`` for float64); x is cast to it and ε
        back to x's dtype, so a float32 model serves a sampler that keeps its state in float64.
        """
        c = self.config
        factor = 2 ** (c.num_levels - 1)
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x must have shape [B, {c.in_channels}, H, W] with H, W divisible by {factor}, got {tuple(x.shape)}"
            )
        t = batch_times(t, x)
        temb = self.temb(t)  # [B, 4ch]

        hs = [self.conv_in(x.to(self.conv_in.weight.dtype))]  # skip connections, (B, ch, H, W) first
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if level.downsample is not None:
                hs.append(level.downsample(hs[-1]))  # (B, C_i, H/2^(i+1), W/2^(i+1))

        h = self.mid(hs[-1], temb)  # (B, C_last, H/2^(L-1), W/2^(L-1))

        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if level.upsample is not None:
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h))).to(x.dtype)  # (B, C, H, W)
