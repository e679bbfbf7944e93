"""MicroDiT: the sparse diffusion transformer of the micro-budget recipe.

Sehwag et al., "Stretching Each Dollar: Diffusion Training from Scratch on a Micro-Budget" (CVPR 2025); the
architecture follows the public code, SonyResearch/micro_diffusion (``micro_diffusion/models/dit.py``):

* patch embedding (patch 2) + a fixed 2D sin-cos position embedding with an interpolation scale;
* text: caption projection, one self-attention block over the text tokens, pooled text = MLP(token mean);
  adaLN input = timestep embedding + pooled text;
* blocks: adaLN-gated self-attention and FFN, ungated cross-attention to the text in every block, QK-LayerNorm,
  no linear biases, SwiGLU dense FFNs; layer-wise scaling of self-attention and FFN widths over depth;
* a patch-mixer (its own width/depth) over all tokens, then **deferred masking**: the backbone runs on a random
  subset of the tokens, the masked slots of the output are zeros (no decoder);
* expert-choice mixture of experts in every second block but the last, in the backbone and the mixer.
* optional TREAD token routing in training (``tread``, ``diffusion/models/token_routing.py``).

The backbone is registered as ``microdit`` in :data:`diffusion.registry.backbones` and plugs into
``LatentDiffusion`` with the UNet's call signature.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from diffusion.models.conditioning import CONDITIONING_MODES, ControlEmbedding
from diffusion.models.token_routing import run_blocks, tread_config
from diffusion.models.layers import (Attention, ExpertChoiceMoE, Mlp, SwiGLU, TimestepEmbedder, layer_norm, modulate,
                                     round_up, sincos_pos_embed_2d, swiglu_hidden)
from diffusion.registry import backbones

log = logging.getLogger(__name__)

__all__ = ['MicroDiTConfig', 'MicroDiT', 'ExpertChoiceMoE', 'DiTBlock', 'PRESETS', 'build_microdit',
           'random_token_mask', 'keep_tokens', 'restore_tokens', 'block_widths']

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


# =============================================================================================
# MicroDiT
# =============================================================================================


class MicroDiT(nn.Module):
    """The MicroDiT backbone (see the module docstring); ``config`` holds every architectural choice.

    ``forward`` has the ``LatentDiffusion`` backbone signature. Masking happens only when asked for with
    ``return_mask=True`` in training mode with ``mask_ratio > 0`` (sampling and evaluation never mask).
    """

    def __init__(self, config: MicroDiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.mask_ratio = cfg.mask_ratio
        self.moe_lr_scale = cfg.moe_lr_scale
        self.tread = tread_config(cfg.tread, cfg.depth)  # applied in training mode only (see forward)
        # The last mixer block's experts skip the tokens masking drops, on CPU tensors only (see forward).
        self.skip_dropped_experts = True
        dim, eps, p = cfg.dim, cfg.norm_eps, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        grid = cfg.input_size // p
        self.register_buffer('pos_embed', sincos_pos_embed_2d(dim, grid, grid, grid, cfg.pos_interp_scale)[None],
                             persistent=False)  # (1, T, D): fixed, rebuilt from the config, never trained
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = Mlp(cfg.caption_channels, dim, eps)  # caption projection
        self.y_emb_preprocess = TextBlock(cfg)
        if cfg.conditioning not in CONDITIONING_MODES:
            raise ValueError(f'unknown MicroDiT conditioning {cfg.conditioning!r}; '
                             f'expected one of {CONDITIONING_MODES}')
        uses_pooled = cfg.conditioning != 'disentangled' or cfg.keep_pooled_text
        self.pooled_y_emb_process = Mlp(dim, dim, eps) if uses_pooled else None  # None: no unused DDP parameters
        self.control_embedding = None if cfg.conditioning == 'none' else \
            ControlEmbedding(dim, cfg.control_feature_dim, cfg.control_gate_end)
        if cfg.use_patch_mixer:
            mixer_std = 0.02 / (2 * cfg.depth)**0.5
            self.patch_mixer = nn.ModuleList(DiTBlock(cfg.patch_mixer_dim, w, cfg, mixer_std)
                                             for w in mixer_widths(cfg))
            self.patch_mixer_map_xin = self._projection(dim, cfg.patch_mixer_dim)
            self.patch_mixer_map_xout = self._projection(cfg.patch_mixer_dim, dim)
            self.patch_mixer_map_y = self._projection(dim, cfg.patch_mixer_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, w, cfg, 0.02 / (2 * ((i + 1) if cfg.depth_init else cfg.depth))**0.5)
            for i, w in enumerate(block_widths(cfg)))
        self.final_norm = layer_norm(dim, eps)
        self.final_adaLN = nn.Sequential(nn.GELU(approximate='tanh'), nn.Linear(dim, 2 * dim))
        self.final_linear = nn.Linear(dim, p * p * cfg.in_channels)
        self.initialize_weights()

    def _projection(self, d_in: int, d_out: int) -> nn.Module:
        if d_in == d_out:
            return nn.Identity()
        return nn.Sequential(layer_norm(d_in, self.config.norm_eps), nn.Linear(d_in, d_out, bias=self.config.use_bias))

    @property
    def sample_size(self) -> int:
        """Latent side the model was configured for (default generation size / VAE factor)."""
        return self.config.input_size

    # ------------------------------------------------------------------ init (as the public code)
    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero biases, then the public code's specific inits on top."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over flattened patches
        pooled = self.pooled_y_emb_process
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.y_embedder.fc1, self.y_embedder.fc2,
                    *((pooled.fc1, pooled.fc2) if pooled is not None else ())):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.transformer_blocks():
            block.init_weights()
        self.y_emb_preprocess.init_weights()
        nn.init.zeros_(self.final_adaLN[-1].weight)  # the output starts at exactly 0
        nn.init.zeros_(self.final_linear.weight)

    def transformer_blocks(self) -> list[DiTBlock]:
        return list(self.patch_mixer if self.config.use_patch_mixer else []) + list(self.blocks)

    # ------------------------------------------------------------------ forward pieces
    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """The buffer at the configured size; other sizes are built on the fly with the same interpolation."""
        base = self.config.input_size // self.config.patch_size
        if grid_h == grid_w == base:
            return self.pos_embed
        emb = sincos_pos_embed_2d(self.config.dim, grid_h, grid_w, base, self.config.pos_interp_scale)
        return emb[None].to(self.pos_embed.device, self.pos_embed.dtype)  # (1, T, D)

    @property
    def uses_controls(self) -> bool:
        """True when ``forward`` takes ``controls``, ``control_dropped`` and ``noise_level``."""
        return self.control_embedding is not None

    def adapt_resolution(self, scale: float) -> None:
        """Resolution transfer: rebuild the sin-cos table with ``pos_interp_scale = scale`` (new / pre-training
        resolution), so the new grid spans the positions the pre-trained model saw (PixArt-alpha, MicroDiT)."""
        self.config = dataclasses.replace(self.config, pos_interp_scale=float(scale))
        grid = self.config.input_size // self.config.patch_size
        table = sincos_pos_embed_2d(self.config.dim, grid, grid, grid, self.config.pos_interp_scale)[None]
        self.pos_embed = table.to(self.pos_embed.device, self.pos_embed.dtype)  # (1, T, D)

    def adaln_input(self, t: Tensor, y: Tensor, text_mask: Optional[Tensor] = None, controls: Optional[Tensor] = None,
                    control_dropped: Optional[Tensor] = None, noise_level: Optional[Tensor] = None) -> Tensor:
        """adaLN conditioning ``c`` (N, D) = timestep embedding + MLP(mean of the processed text tokens)
        [+ control embedding: gated by ``noise_level`` when disentangled, at full strength when summed].

        The one place the adaLN input is built, so further conditioning can be added here.
        """
        c = self.t_embedder(t)  # (N, D)
        if self.pooled_y_emb_process is not None:
            if text_mask is None:
                pooled = y.mean(dim=1)  # (N, D)
            else:
                m = text_mask.to(y.dtype).unsqueeze(-1)  # (N, L, 1)
                pooled = (y * m).sum(1) / m.sum(1).clamp(min=1)
            c = c + self.pooled_y_emb_process(pooled)
        if self.control_embedding is not None:
            if controls is None or (noise_level is None and self.config.conditioning == 'disentangled'):
                raise ValueError(f'MicroDiT with {self.config.conditioning} conditioning: pass controls (N, 8) '
                                 'and noise_level (N,)')
            n = c.shape[0]
            # summed: noise level 0 opens every gate, so the controls act at every step (SDXL's form)
            level = torch.zeros(n, device=c.device) if self.config.conditioning == 'sdxl_summed' \
                else noise_level.to(c.device).reshape(-1).expand(n)
            c = c + self.control_embedding(controls.to(c.device), level, control_dropped).to(c.dtype)
        return c

    def unpatchify(self, x: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c = self.config.patch_size, self.config.in_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        return torch.einsum('nhwpqc->nchpwq', x).reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def forward(self, x: Tensor, t: Tensor, *, text_hidden: Tensor, text_mask: Optional[Tensor] = None,
                text_pooled: Optional[Tensor] = None, time_ids: Optional[Tensor] = None,
                return_mask: bool = False, controls: Optional[Tensor] = None, control_dropped: Optional[Tensor] = None,
                noise_level: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Optional[Tensor]]]:
        """Predict the raw network output (EDM's F).

        Args:
            x: Noised, preconditioned latents (N, C, H, W).
            t: Times (N,) or a scalar (EDM ``c_noise``).
            text_hidden: Per-token text states (N, L, caption_channels).
            text_mask: Optional (N, L) padding mask, True for real tokens (None attends to all, as the public
                code does).
            text_pooled: Unused: MicroDiT pools its own processed text tokens.
            time_ids: Unused (SDXL micro-conditioning is a UNet feature).
            return_mask: Return ``(out, mask)``; then, in training mode with ``self.mask_ratio > 0``, the
                backbone runs on a random subset of tokens and ``mask`` (N, H, W) is 1 on latent pixels whose
                patch was removed (their output is 0), else ``mask`` is None.
            controls: ``(N, 8)`` control metadata (``conditioning`` other than ``none``).
            control_dropped: ``(N,)`` bool: rows that get the learned null control.
            noise_level: ``(N,)`` noise level in ``[0, 1]`` gating the controls (``disentangled``).

        Returns:
            The output (N, C, H, W), or ``(out, mask)`` with ``return_mask``.
        """
        del text_pooled, time_ids
        n, _, h, w = x.shape
        gh, gw = h // self.config.patch_size, w // self.config.patch_size
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.position_embedding(gh, gw)  # (N, T, D)
        y = self.y_embedder(text_hidden)  # (N, L, D)
        y = self.y_emb_preprocess(y, text_mask)  # (N, L, D)
        c = self.adaln_input(t.expand(n) if t.dim() else t.reshape(1).expand(n), y, text_mask, controls,
                             control_dropped, noise_level)  # (N, D)
        masked = return_mask and self.training and self.mask_ratio > 0
        if masked:  # drawn before the mixer (which draws nothing): its last block can skip the dropped tokens
            ids_keep, ids_restore, mask = random_token_mask(n, gh * gw, self.mask_ratio, x.device)
        if self.config.use_patch_mixer:
            x = self.patch_mixer_map_xin(x)  # (N, T, D_mixer)
            y_mixer = self.patch_mixer_map_y(y)  # (N, L, D_mixer)
            # The last mixer block's experts compute only tokens that masking keeps (the public code computes all
            # and drops 3/4 of them): same routing, same kept outputs and gradients, less work. Its padded width
            # is data-dependent, read on the host: done for CPU tensors only, where that read is free; on a GPU
            # it would be a device sync every step, and under torch.compile a graph break.
            skip = masked and self.skip_dropped_experts and x.device.type == 'cpu' \
                and not torch.compiler.is_compiling()
            active = mask == 0 if skip else None  # (N, T) bool
            for i, block in enumerate(self.patch_mixer):
                x = block(x, y_mixer, c, text_mask, active if i == len(self.patch_mixer) - 1 else None)
        if masked:
            x = keep_tokens(x, ids_keep)  # (N, K, D_mixer)
        if self.config.use_patch_mixer:
            x = self.patch_mixer_map_xout(x)  # (N, K, D): projected after masking, to save compute
        routing = self.tread if self.training else None  # TREAD: routed tokens skip a range of blocks
        x = run_blocks(self.blocks, x, lambda block, h: block(h, y, c, text_mask), routing)  # (N, K, D)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))  # (N, K, p*p*C)
        if masked:
            x = restore_tokens(x, ids_restore)  # (N, T, p*p*C), zeros where masked
        out = self.unpatchify(x, gh, gw)  # (N, C, H, W)
        if not return_mask:
            return out
        if not masked:
            return out, None
        p = self.config.patch_size
        pixel_mask = mask.view(n, gh, gw).repeat_interleave(p, 1).repeat_interleave(p, 2)  # (N, H, W)
        return out, pixel_mask

    # ------------------------------------------------------------------ composer policies, optimizer groups
    @staticmethod
    def fsdp_wrap_fn(module: nn.Module) -> bool:
        """Composer FSDP auto-wrap policy: one FSDP unit per transformer block."""
        return isinstance(module, (DiTBlock, TextBlock))

    @staticmethod
    def activation_checkpointing_fn(module: nn.Module) -> bool:
        """Composer activation-checkpointing policy: the same blocks as :meth:`fsdp_wrap_fn`."""
        return isinstance(module, (DiTBlock, TextBlock))

    def moe_parameters(self) -> list[nn.Parameter]:
        """Expert and router parameters, selected by module type (not by a parameter name)."""
        return [p for m in self.modules() if isinstance(m, ExpertChoiceMoE) for p in m.parameters()]


# =============================================================================================
# Builder
# =============================================================================================
_FIELDS = {f.name for f in dataclasses.fields(MicroDiTConfig)}


def microdit_config(preset: str = 'microdit-mini', **overrides: Any) -> MicroDiTConfig:
    """The config of ``preset`` with ``overrides`` applied (unknown names are an error naming them)."""
    if preset not in PRESETS:
        raise ValueError(f'unknown MicroDiT preset {preset!r}; available: {sorted(PRESETS)}')
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ValueError(f'MicroDiT preset {preset!r}: unknown override(s) {unknown}; accepted: {sorted(_FIELDS)}')
    for key in ('qkv_ratio', 'mlp_ratio'):
        if key in overrides:
            overrides[key] = tuple(float(v) for v in overrides[key])
    return dataclasses.replace(PRESETS[preset](), **overrides)


def build_microdit(preset: str = 'microdit-mini', cross_attention_dim: Optional[int] = None,
                   in_channels: Optional[int] = None, out_channels: Optional[int] = None,
                   sample_size: Optional[int] = None, pooled_text_dim: Optional[int] = None,
                   attention: str = 'sdpa', device: Union[str, torch.device, None] = None,
                   **overrides: Any) -> MicroDiT:
    """Build a MicroDiT from a named preset (``microdit-xl-2``, ``microdit-tiny-2``, ``microdit-mini``).

    Args:
        preset: One of :data:`PRESETS`.
        cross_attention_dim: Text state width (``caption_channels``); ``LatentDiffusion`` fills it in from
            the text encoder.
        in_channels: Latent channels (filled in from the autoencoder).
        out_channels: Must equal ``in_channels`` (MicroDiT predicts in latent space).
        sample_size: Latent side (``input_size``), sets the position-embedding buffer.
        pooled_text_dim: Ignored: MicroDiT pools its own text tokens (accepted so every text encoder fits).
        attention: ``'sdpa'`` only: PyTorch's scaled-dot-product attention, which picks FlashAttention /
            memory-efficient kernels on CUDA by itself.
        device: Device to create parameters on (``'meta'`` builds without memory).
        **overrides: :class:`MicroDiTConfig` fields (``mask_ratio``, ``pos_interp_scale``, ``moe_lr_scale``...).
    """
    del pooled_text_dim
    if attention != 'sdpa':
        raise ValueError(f"MicroDiT attention {attention!r}: only 'sdpa' (PyTorch scaled-dot-product attention, "
                         "which uses FlashAttention / memory-efficient kernels on CUDA) is implemented")
    if out_channels is not None and in_channels is not None and out_channels != in_channels:
        raise ValueError(f'MicroDiT predicts in latent space: out_channels ({out_channels}) must equal '
                         f'in_channels ({in_channels})')
    named = {'caption_channels': cross_attention_dim, 'in_channels': in_channels, 'input_size': sample_size}
    overrides.update({k: v for k, v in named.items() if v is not None})
    cfg = microdit_config(preset, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = MicroDiT(cfg)
    log.info('MicroDiT %s: %.1fM parameters', preset, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


backbones.register('microdit', func=build_microdit)
