"""Small transformer layers shared by the diffusion transformers (MicroDiT, see ``microdit.py``).

Each layer follows the public MicroDiT code (SonyResearch/micro_diffusion, ``micro_diffusion/models/utils.py``)
in structure and parameter layout: LayerNorms with a weight and no bias, QK-LayerNorm over the joint head vector
(no affine), optional linear biases, SwiGLU feed-forward with the LLaMA hidden-width rounding, and the
expert-choice mixture-of-experts FFN.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['modulate', 'layer_norm', 'sincos_pos_embed_2d', 'timestep_embedding', 'swiglu_hidden',
           'round_up', 'Attention', 'SwiGLU', 'Mlp', 'TimestepEmbedder', 'ExpertChoiceMoE']


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation (Peebles & Xie 2023, DiT Sec. 3.2): ``x * (1 + scale) + shift`` per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D)


def layer_norm(dim: int, eps: float = 1e-6, affine: bool = True) -> nn.LayerNorm:
    """LayerNorm with a weight but no bias (or neither, for QK-norm), as the public code's ``create_norm``."""
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=False)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return multiple * ((value + multiple - 1) // multiple)


def swiglu_hidden(hidden: int, multiple_of: int) -> int:
    """SwiGLU hidden width: two thirds of the dense width (same FLOPs as a 2-matrix MLP), rounded up."""
    return round_up(int(2 * hidden / 3), multiple_of)


# =============================================================================================
# Fixed embeddings
# =============================================================================================


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000**(np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # (D/2,)
    out = np.einsum('m,d->md', pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interp_scale: float = 1.0) -> Tensor:
    """Fixed 2D sin-cos position embedding of a ``grid_h x grid_w`` patch grid, row-major ``(gh*gw, dim)``.

    Positions are ``arange(G) / (G / base_size) / interp_scale`` (PixArt-alpha's interpolation, used by
    MicroDiT): at 512 px (G = 32, base 32) with ``interp_scale = 2`` they are 0, 0.5, ..., 15.5, the range
    a 256 px model (G = 16) was trained on. The first half of the channels encodes the column, the second the
    row, in the order the public code produces.
    """
    if dim % 4:
        raise ValueError(f'sin-cos position embedding needs a width divisible by 4, got {dim}')
    rows = np.arange(grid_h, dtype=np.float32) / (grid_h / base_size) / interp_scale
    cols = np.arange(grid_w, dtype=np.float32) / (grid_w / base_size) / interp_scale
    col_grid, row_grid = np.meshgrid(cols, rows)  # each (gh, gw)
    emb = np.concatenate([_sincos_1d(dim // 2, col_grid), _sincos_1d(dim // 2, row_grid)], axis=1)
    return torch.from_numpy(emb).float()  # (gh*gw, D)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` of scalar times, ``f_i = max_period^(-i/half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar time (EDM ``c_noise``) -> sinusoid of ``freq_dim`` -> Linear, GELU(tanh), Linear -> ``dim``."""

    def __init__(self, dim: int, freq_dim: int = 512) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.GELU(approximate='tanh'), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))  # (N, D)


# =============================================================================================
# Attention and feed-forward
# =============================================================================================


class Attention(nn.Module):
    """Multi-head self- or cross-attention with QK-LayerNorm over the joint head vector.

    The q/k normalisation is one non-affine LayerNorm over all heads together (``hidden`` wide), not one per
    head: this is what the public MicroDiT code does, in self- and cross-attention alike.

    Args:
        dim: Width of the queries' stream (input and output).
        hidden: Width of q, k and v (``heads * head_dim``); layer-wise scaling shrinks it.
        head_dim: Width of one head.
        context_dim: Width of the keys' stream for cross-attention; ``None`` for self-attention.
        bias: Biases on the q/k/v and output projections.
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, hidden: int, head_dim: int, context_dim: Optional[int] = None,
                 bias: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        if hidden % head_dim:
            raise ValueError(f'attention width {hidden} is not a multiple of head_dim {head_dim}')
        self.heads, self.head_dim, self.hidden = hidden // head_dim, head_dim, hidden
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, hidden, bias=bias)
            self.kv = nn.Linear(context_dim, 2 * hidden, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.norm_q = layer_norm(hidden, eps, affine=False)
        self.norm_k = layer_norm(hidden, eps, affine=False)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, key_mask: Optional[Tensor] = None) -> Tensor:
        """``x`` (N, T, dim), ``context`` (N, L, context_dim) for cross-attention, ``key_mask`` (N, L) True=attend."""
        n, t, _ = x.shape
        if self.is_cross:
            q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)  # (N, T, H), (N, L, H) x 2
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # (N, T, H) x 3
        q, k = self.norm_q(q), self.norm_k(k)

        def heads(z: Tensor) -> Tensor:
            return z.view(n, -1, self.heads, self.head_dim).transpose(1, 2)  # (N, heads, T|L, head_dim)

        attn_mask = None if key_mask is None else key_mask.bool()[:, None, None, :]  # (N, 1, 1, L)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(n, t, self.hidden))  # (N, T, dim)

    def init_weights(self, out_std: float) -> None:
        """Truncated-normal init: 0.02 for the input projections, ``out_std`` for the output projection."""
        for lin in ((self.q, self.kv) if self.is_cross else (self.qkv,)):
            nn.init.trunc_normal_(lin.weight, std=0.02)
        nn.init.trunc_normal_(self.proj.weight, std=out_std)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``w3(silu(w1 x) * w2 x)``; ``hidden`` is the width after rounding."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))

    def init_weights(self, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, std=0.02)
        nn.init.trunc_normal_(self.w2.weight, std=out_std)
        nn.init.trunc_normal_(self.w3.weight, std=out_std)


class Mlp(nn.Module):
    """timm-style MLP with a norm between the layers: Linear, GELU(tanh), LayerNorm, Linear (all with bias)."""

    def __init__(self, in_dim: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.act = nn.GELU(approximate='tanh')
        self.norm = layer_norm(dim, eps)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


# =============================================================================================
# Expert-choice mixture of experts (Zhou et al. 2022)
# =============================================================================================


class ExpertChoiceMoE(nn.Module):
    """Expert-choice MoE FFN: each expert picks its top ``int(capacity * T / E)`` tokens of each sample.

    Routing probabilities are a softmax over experts; experts are GELU two-matrix MLPs; a token picked by
    several experts sums their gated outputs, a token picked by none gets 0. No auxiliary loss. Vectorised
    over samples and experts (gather -> batched matmuls -> scatter-add); no Python loop.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity: float) -> None:
        super().__init__()
        self.num_experts, self.capacity, self.hidden = num_experts, capacity, hidden
        self.gate = nn.Linear(dim, num_experts, bias=False)  # the router
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def tokens_per_expert(self, tokens: int) -> int:
        return int(self.capacity * tokens / self.num_experts)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gates ``g`` (N, E, k) and token indices ``idx`` (N, E, k) each expert takes."""
        probs = self.gate(x).softmax(dim=-1)  # (N, T, E)
        return probs.transpose(1, 2).topk(self.tokens_per_expert(x.shape[1]), dim=-1)  # (N, E, k) x 2

    def forward(self, x: Tensor, active: Optional[Tensor] = None) -> Tensor:
        """``x`` (N, T, D) -> (N, T, D). ``active`` (N, T) bool: the caller keeps only these tokens' outputs
        (deferred masking drops the others right after this layer). Routing still sees every token, so each
        expert picks the same tokens as without it, but only (expert, token) pairs with an active token are
        computed; inactive tokens' outputs are 0. Active tokens' outputs and every gradient are unchanged. The
        padded width is the busiest expert's count of active picks, read on the host: on an accelerator that is a
        device-to-host sync, so MicroDiT passes ``active`` only for CPU tensors.

        Under autocast the router's softmax may run in fp32 (CUDA autocast does, CPU autocast does not): the gated
        expert outputs are then fp32 and are summed over experts in fp32; the result has the dtype of ``x``."""
        n, t, d = x.shape
        e = self.num_experts
        g, idx = self.route(x)  # (N, E, k)
        # Rows of x.view(N*T, D) each expert takes, expert-major: one contiguous (E, N*k, D) gather feeds the
        # batched matmuls directly (no permute copies forward or backward), and index_select's backward is an
        # index_add (not the slower accumulate-index_put of advanced indexing).
        rows = (idx + t * torch.arange(n, device=x.device)[:, None, None]).transpose(0, 1).reshape(e, -1)  # (E, N*k)
        gates = g.transpose(0, 1).reshape(e, -1)  # (E, N*k)
        if active is not None:
            take = active.reshape(-1)[rows]  # (E, N*k) True where the picked token is active
            width = int(take.sum(dim=1).max())  # the busiest expert's active picks; the others are padded
            first = take.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :width]  # active first
            rows, gates = rows.gather(1, first), gates.gather(1, first) * take.gather(1, first)  # padding: gate 0
        rows = rows.reshape(-1)  # (E*M,), M = N*k or the padded width
        flat = x.reshape(n * t, d)
        h = flat.index_select(0, rows).view(e, -1, d)  # (E, M, D)
        h = F.gelu(torch.bmm(h, self.w1))  # (E, M, F)
        h = torch.bmm(h, self.w2) * gates.unsqueeze(-1)  # (E, M, D), gated, in the promoted dtype of the two
        out = h.new_zeros(n * t, d).index_add(0, rows, h.view(-1, d))  # (N*T, D), summed over experts
        return out.view(n, t, d).to(x.dtype)  # (N, T, D)

    def init_weights(self, out_std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, std=0.02)
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=out_std)
