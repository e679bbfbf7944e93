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
``LatentDiffusion`` with the UNet's call signature. Its configuration, widths, masking and blocks are in
``diffusion/models/microdit_blocks.py``, and every name of it is importable from here too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from diffusion.models.conditioning import CONDITIONING_MODES, ControlEmbedding
from diffusion.models.layers import ExpertChoiceMoE, Mlp, TimestepEmbedder, layer_norm, modulate, sincos_pos_embed_2d
from diffusion.models.microdit_blocks import (PRESETS, DiTBlock, MicroDiTConfig, TextBlock, block_widths, keep_tokens,
                                              mixer_widths, random_token_mask, restore_tokens)
from diffusion.models.token_routing import run_blocks, tread_config
from diffusion.registry import backbones

log = logging.getLogger(__name__)

__all__ = ['MicroDiTConfig', 'MicroDiT', 'ExpertChoiceMoE', 'DiTBlock', 'TextBlock', 'PRESETS', 'build_microdit',
           'microdit_config', 'random_token_mask', 'keep_tokens', 'restore_tokens', 'block_widths', 'mixer_widths']

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
