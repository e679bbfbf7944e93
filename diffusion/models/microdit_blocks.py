"""MicroDiT's parts: its configuration and presets, the layer-wise widths, deferred token masking and the blocks.

The backbone that assembles them, :class:`~diffusion.models.microdit.MicroDiT`, and its builder are in
``diffusion/models/microdit.py`` (which re-exports every name here); the architecture and its sources are
described there.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from diffusion.models.layers import (Attention, ExpertChoiceMoE, SwiGLU, layer_norm, modulate, round_up,
                                     swiglu_hidden)

__all__ = ['MicroDiTConfig', 'PRESETS', 'block_widths', 'mixer_widths', 'random_token_mask', 'keep_tokens',
           'restore_tokens', 'DiTBlock', 'TextBlock']

# =============================================================================================
# Configuration and presets
# =============================================================================================


@dataclasses.dataclass
class MicroDiTConfig:
    """Every architectural choice of a MicroDiT (names as in the public code's ``DiT``).

    ``qkv_ratio`` / ``mlp_ratio`` are the end points of the layer-wise scaling (``np.linspace`` over depth);
    ``mask_ratio`` is the training mask ratio (changed per stage or by ``diffusion.algorithms.mask_schedule``);
    ``moe_lr_scale`` multiplies the learning rate of expert and router parameters (see ``param_groups``).
    """
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    dim: int = 1024
    depth: int = 28
    head_dim: int = 64
    multiple_of: int = 256
    caption_channels: int = 1024
    pos_interp_scale: float = 1.0
    norm_eps: float = 1e-6
    depth_init: bool = True
    qkv_ratio: tuple[float, float] = (0.5, 1.0)
    mlp_ratio: tuple[float, float] = (0.5, 4.0)
    use_patch_mixer: bool = True
    patch_mixer_depth: int = 6
    patch_mixer_dim: int = 768
    patch_mixer_qkv_ratio: float = 1.0
    patch_mixer_mlp_ratio: float = 4.0
    use_bias: bool = False
    num_experts: int = 8
    expert_capacity: float = 2.0
    experts_every_n: int = 2
    mask_ratio: float = 0.0
    moe_lr_scale: float = 1.0
    # Control metadata in the adaLN input (diffusion/models/conditioning.py; Berrada et al. 2024): 'none',
    # 'sdxl_summed' (control embedding summed in at every noise level) or 'disentangled' (gated by the noise level,
    # learned null control; the pooled text leaves adaLN unless keep_pooled_text).
    conditioning: str = 'none'
    keep_pooled_text: bool = False
    control_feature_dim: int = 64
    control_gate_end: Any = 1.0  # float, or {group: u_end} (groups: size, crop)
    # TREAD token routing in training, {ratio, start, end} (diffusion/models/token_routing.py); None: off.
    tread: Optional[dict[str, Any]] = None


def microdit_xl_2() -> MicroDiTConfig:
    """MicroDiT_XL_2, the paper's 1.16B model: 1,165,442,320 parameters (4 latent channels, 1024-d text)."""
    return MicroDiTConfig()


def microdit_tiny_2() -> MicroDiTConfig:
    """MicroDiT_Tiny_2: 200,692,752 parameters."""
    return MicroDiTConfig(dim=512, depth=16, head_dim=32, patch_mixer_depth=4, patch_mixer_dim=512)


def microdit_mini() -> MicroDiTConfig:
    """The same structure (mixer with MoE, layer-wise scaling, 8 experts) at a width that trains on a CPU."""
    return MicroDiTConfig(input_size=16, dim=192, depth=6, head_dim=32, multiple_of=64, caption_channels=384,
                          patch_mixer_depth=2, patch_mixer_dim=128)


PRESETS: dict[str, Callable[[], MicroDiTConfig]] = {
    'microdit-xl-2': microdit_xl_2,
    'microdit-tiny-2': microdit_tiny_2,
    'microdit-mini': microdit_mini,
}


def block_widths(cfg: MicroDiTConfig) -> list[dict[str, Any]]:
    """Per backbone block: self-attention width, heads, MoE or not, FFN hidden width (after rounding).

    Layer-wise scaling exactly as coded: ``qkv = dim`` if the ratio is 1 else ``int(dim*r)`` rounded up to a
    multiple of ``2*head_dim``; dense FFN ``int(2*int(dim*r)/3)`` and MoE ``int(dim*r)``, each rounded up to
    ``multiple_of``. MoE in blocks ``i < depth-1`` with ``(i+1) % experts_every_n == 0``.
    """
    qkv = np.linspace(cfg.qkv_ratio[0], cfg.qkv_ratio[1], num=cfg.depth, dtype=float)
    mlp = np.linspace(cfg.mlp_ratio[0], cfg.mlp_ratio[1], num=cfg.depth, dtype=float)
    moe = [i < cfg.depth - 1 and (i + 1) % cfg.experts_every_n == 0 for i in range(cfg.depth)]
    return [_widths(cfg.dim, cfg.head_dim, cfg.multiple_of, float(qkv[i]), float(mlp[i]), moe[i])
            for i in range(cfg.depth)]


def mixer_widths(cfg: MicroDiTConfig) -> list[dict[str, Any]]:
    """Per patch-mixer block (unscaled widths; MoE in blocks ``i >= 1`` with ``(i+1) % every_n == 0``)."""
    return [_widths(cfg.patch_mixer_dim, cfg.head_dim, cfg.multiple_of, cfg.patch_mixer_qkv_ratio,
                    cfg.patch_mixer_mlp_ratio, i >= 1 and (i + 1) % cfg.experts_every_n == 0)
            for i in range(cfg.patch_mixer_depth)]


def _widths(dim: int, head_dim: int, multiple_of: int, qkv_ratio: float, mlp_ratio: float,
            moe: bool) -> dict[str, Any]:
    qkv = dim if qkv_ratio == 1 else round_up(int(dim * qkv_ratio), 2 * head_dim)
    dense = int(dim * mlp_ratio)
    ffn = round_up(dense, multiple_of) if moe else swiglu_hidden(dense, multiple_of)
    return {'qkv': qkv, 'heads': qkv // head_dim, 'moe': moe, 'ffn': ffn}


# =============================================================================================
# Deferred masking (MAE-style random subsets, He et al. 2022; applied after the patch-mixer)
# =============================================================================================


def random_token_mask(n: int, tokens: int, mask_ratio: float, device: Union[torch.device, str, None] = None,
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """A uniformly random subset of ``int(tokens * (1 - mask_ratio))`` tokens per sample, independently.

    Returns:
        ``ids_keep`` (n, K) token indices kept, ``ids_restore`` (n, T) the inverse permutation, and ``mask``
        (n, T) with 1 for removed tokens, 0 for kept.
    """
    keep = int(tokens * (1 - mask_ratio))
    noise = torch.rand(n, tokens, device=device, generator=generator)  # (n, T)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the first K are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(n, tokens, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, mask.gather(1, ids_restore)


def keep_tokens(x: Tensor, ids_keep: Tensor) -> Tensor:
    """Gather the kept tokens: (N, T, D) -> (N, K, D), in ``ids_keep`` order."""
    return x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(x: Tensor, ids_restore: Tensor) -> Tensor:
    """Put kept tokens back in place and zeros in masked slots: (N, K, P) -> (N, T, P)."""
    n, keep, p = x.shape
    filler = x.new_zeros(n, ids_restore.shape[1] - keep, p)  # the public code's zero `mask_token`
    full = torch.cat([x, filler], dim=1)  # (N, T, P) in shuffled order
    return full.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, p))


# =============================================================================================
# Transformer block
# =============================================================================================


class DiTBlock(nn.Module):
    """adaLN block: gated self-attention, ungated cross-attention (full width), gated FFN (SwiGLU or MoE)."""

    def __init__(self, dim: int, widths: dict[str, Any], cfg: MicroDiTConfig, out_std: float) -> None:
        super().__init__()
        eps, bias = cfg.norm_eps, cfg.use_bias
        self.out_std = out_std
        self.norm1, self.norm2, self.norm3 = layer_norm(dim, eps), layer_norm(dim, eps), layer_norm(dim, eps)
        self.attn = Attention(dim, widths['qkv'], cfg.head_dim, bias=bias, eps=eps)
        self.cross_attn = Attention(dim, dim, cfg.head_dim, context_dim=dim, bias=bias, eps=eps)
        self.mlp = (ExpertChoiceMoE(dim, widths['ffn'], cfg.num_experts, cfg.expert_capacity) if widths['moe']
                    else SwiGLU(dim, widths['ffn'], bias=bias))
        self.adaLN_modulation = nn.Sequential(nn.GELU(approximate='tanh'), nn.Linear(cfg.dim, 6 * dim))

    def forward(self, x: Tensor, y: Tensor, c: Tensor, text_mask: Optional[Tensor] = None,
                active: Optional[Tensor] = None) -> Tensor:
        """``active`` (N, T) bool, for the block right before deferred masking: only these tokens' outputs are
        used, so an MoE FFN computes experts for them alone (see ``ExpertChoiceMoE.forward``)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # (N, D) x 6
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm2(x), y, key_mask=text_mask)
        h = modulate(self.norm3(x), shift2, scale2)
        h = self.mlp(h, active) if isinstance(self.mlp, ExpertChoiceMoE) and active is not None else self.mlp(h)
        return x + gate2.unsqueeze(1) * h  # (N, T, D)

    def init_weights(self) -> None:
        self.attn.init_weights(self.out_std)
        self.cross_attn.init_weights(self.out_std)
        self.mlp.init_weights(self.out_std)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # each block starts as the identity


class TextBlock(nn.Module):
    """Pre-norm self-attention + SwiGLU block over the projected text tokens (no adaLN)."""

    def __init__(self, cfg: MicroDiTConfig) -> None:
        super().__init__()
        dim, eps = cfg.dim, cfg.norm_eps
        self.norm1, self.norm2 = layer_norm(dim, eps), layer_norm(dim, eps)
        self.attn = Attention(dim, dim, cfg.head_dim, bias=cfg.use_bias, eps=eps)
        self.mlp = SwiGLU(dim, swiglu_hidden(4 * dim, cfg.multiple_of), bias=cfg.use_bias)

    def forward(self, y: Tensor, text_mask: Optional[Tensor] = None) -> Tensor:
        y = y + self.attn(self.norm1(y), key_mask=text_mask)
        return y + self.mlp(self.norm2(y))  # (N, L, D)

    def init_weights(self) -> None:
        self.attn.init_weights(0.02)
        self.mlp.init_weights(0.02)
        nn.init.zeros_(self.attn.proj.weight)  # the block starts as the identity on the text states
        nn.init.zeros_(self.mlp.w3.weight)
