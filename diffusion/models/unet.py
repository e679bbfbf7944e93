"""UNet backbones: diffusers ``UNet2DConditionModel`` presets and a thin wrapper.

CommonCanvas-S uses the SD2-base UNet, CommonCanvas-L an SDXL-size UNet with SDXL's added
conditioning (pooled text + size/crop "time ids"). The mini presets keep each structure at a
width that trains on a CPU. The builder is registered as ``unet`` in
:data:`diffusion.registry.backbones`.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import Any, Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import Tensor, nn

from diffusion.models.conditioning import CONDITIONING_MODES, ControlEmbedding
from diffusion.registry import backbones

log = logging.getLogger(__name__)

# =============================================================================================
# Presets: each returns a UNet2DConditionModel config; `pooled_text_dim` is ours (see below)
# =============================================================================================
_SD2_BLOCKS = dict(
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
)
_SDXL_BLOCKS = dict(
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
    addition_embed_type='text_time',
)
_COMMON = dict(in_channels=4, out_channels=4, layers_per_block=2, use_linear_projection=True, flip_sin_to_cos=True,
               freq_shift=0, norm_num_groups=32)


def sd2_base() -> dict[str, Any]:
    """SD2-base UNet (CommonCanvas-S): 865,910,724 parameters. ``attention_head_dim`` is diffusers'
    legacy name for the number of heads (head width 64)."""
    return dict(**_COMMON, **_SD2_BLOCKS, sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024)


def sdxl_base() -> dict[str, Any]:
    """SDXL-base UNet (CommonCanvas-L): 2,567,463,684 parameters. Added conditioning input is
    6 time ids x 256 Fourier features + the 1280-d pooled text embedding = 2816."""
    return dict(**_COMMON, **_SDXL_BLOCKS, sample_size=128, block_out_channels=(320, 640, 1280),
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                addition_time_embed_dim=256, pooled_text_dim=1280)


def mini_s() -> dict[str, Any]:
    """SD2 structure at 1/10 width for CPU runs: 9.4M parameters with a 384-d text encoder."""
    return dict(**_COMMON, **_SD2_BLOCKS, sample_size=32, block_out_channels=(32, 64, 128, 128),
                attention_head_dim=(1, 2, 4, 4), cross_attention_dim=384)


def mini_l() -> dict[str, Any]:
    """SDXL structure (text_time conditioning, deeper transformer stack at low resolution) at CPU
    width: 28.9M parameters with a 384-d text encoder."""
    return dict(**_COMMON, **_SDXL_BLOCKS, sample_size=32, block_out_channels=(64, 128, 192),
                attention_head_dim=(2, 4, 6), transformer_layers_per_block=(1, 2, 3), cross_attention_dim=384,
                addition_time_embed_dim=32, pooled_text_dim=None)


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    'sd2-base': sd2_base,
    'sdxl-base': sdxl_base,
    'mini-s': mini_s,
    'mini-l': mini_l,
}
_UNET_KWARGS = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {'self'}


def unet_config(preset: str = 'mini-s', conditioning: str = 'auto', control_feature_dim: int = 64,
                **overrides: Any) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of ``preset`` updated by ``overrides``.

    For ``text_time`` presets, ``pooled_text_dim`` (default: the preset's, else
    ``cross_attention_dim``) sets ``projection_class_embeddings_input_dim = 6 *
    addition_time_embed_dim + pooled_text_dim`` unless that is given explicitly.

    ``conditioning`` (see :func:`build_unet`) switches the added conditioning: ``sdxl_summed`` makes any preset
    ``text_time`` (``addition_time_embed_dim`` defaults to ``control_feature_dim``), ``none`` and
    ``disentangled`` remove it, and ``disentangled`` adds diffusers' ``identity`` class embedding, through which
    the wrapper adds its own gated control embedding to the time embedding.

    Raises:
        ValueError: Unknown preset or an override that ``UNet2DConditionModel`` does not accept.
    """
    if preset not in PRESETS:
        raise ValueError(f'unknown UNet preset {preset!r}; available: {sorted(PRESETS)}')
    unknown = set(overrides) - _UNET_KWARGS - {'pooled_text_dim'}
    if unknown:
        raise ValueError(f'UNet preset {preset!r}: unknown override(s) {sorted(unknown)}; '
                         f'UNet2DConditionModel accepts {sorted(_UNET_KWARGS)}')
    config = PRESETS[preset]()
    config.update(overrides)
    mode = resolve_conditioning(config, conditioning)
    if mode == 'sdxl_summed' and config.get('addition_embed_type') != 'text_time':
        config.update(addition_embed_type='text_time')
        config.setdefault('addition_time_embed_dim', control_feature_dim)
    elif mode != 'sdxl_summed':
        config['addition_embed_type'] = None
        if mode == 'disentangled':
            config['class_embed_type'] = 'identity'
    pooled_dim = config.pop('pooled_text_dim', None)
    if config.get('addition_embed_type') == 'text_time' and 'projection_class_embeddings_input_dim' not in overrides:
        pooled_dim = pooled_dim or config['cross_attention_dim']
        config['projection_class_embeddings_input_dim'] = 6 * config['addition_time_embed_dim'] + pooled_dim
    return config


def resolve_conditioning(config: dict[str, Any], conditioning: str) -> str:
    """``auto`` -> the config's own form (``sdxl_summed`` for ``text_time`` configs, else ``none``)."""
    if conditioning == 'auto':
        return 'sdxl_summed' if config.get('addition_embed_type') == 'text_time' else 'none'
    if conditioning not in CONDITIONING_MODES:
        raise ValueError(f'unknown UNet conditioning {conditioning!r}; expected auto or one of {CONDITIONING_MODES}')
    return conditioning


# =============================================================================================
# The wrapper
# =============================================================================================


class UNetBackbone(nn.Module):
    """A diffusers UNet with the backbone call signature the ``LatentDiffusion`` model uses.

    Conditioning forms (``conditioning``): ``none`` (text through cross-attention only), ``sdxl_summed`` (SDXL:
    Fourier features of the 6 size/crop time ids and the pooled text, summed into the time embedding) and
    ``disentangled`` (Berrada et al. 2024, our candidate form: text through cross-attention only; the 8 controls
    of ``diffusion.models.conditioning`` embedded on their own, gated by the noise level, and added to the time
    embedding; the pooled text joins ungated only with ``pooled_projection``).

    Args:
        unet: The diffusers model (kept as ``self.unet`` so export can call ``save_pretrained``).
        conditioning: ``none``, ``sdxl_summed`` or ``disentangled`` (resolved, not ``auto``).
        control_embedding: The gated control embedding (``disentangled`` only).
        pooled_projection: Pooled text -> time-embedding width (``disentangled`` with pooled text kept).
    """

    def __init__(self, unet: UNet2DConditionModel, conditioning: str = 'none',
                 control_embedding: ControlEmbedding | None = None, pooled_projection: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.conditioning = conditioning
        self.control_embedding = control_embedding
        self.pooled_projection = pooled_projection
        if (conditioning == 'disentangled') != (control_embedding is not None):
            raise ValueError('a control_embedding is needed with, and only with, disentangled conditioning')

    @property
    def sample_size(self) -> int:
        """Latent side the UNet was configured for (default generation size / VAE factor)."""
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def uses_added_conditioning(self) -> bool:
        """True for SDXL-style configs that need pooled text and time ids."""
        return self.unet.config.addition_embed_type == 'text_time'

    @property
    def uses_controls(self) -> bool:
        """True when the backbone takes ``controls``, ``control_dropped`` and ``noise_level`` (disentangled)."""
        return self.control_embedding is not None

    def forward(self, x: Tensor, t: Tensor, *, text_hidden: Tensor, text_mask: Tensor | None = None,
                text_pooled: Tensor | None = None, time_ids: Tensor | None = None, controls: Tensor | None = None,
                control_dropped: Tensor | None = None, noise_level: Tensor | None = None) -> Tensor:
        """Predict the raw network output.

        Args:
            x: Noised latents ``(B, C, H, W)`` (already scaled by the schedule).
            t: Timesteps ``(B,)`` or a scalar (integer DDPM steps or EDM ``c_noise``).
            text_hidden: Per-token text states ``(B, L, cross_attention_dim)``.
            text_mask: Optional ``(B, L)`` mask, 1 / True for real tokens.
            text_pooled: Pooled text embedding ``(B, pooled_text_dim)`` (SDXL-style only).
            time_ids: ``(B, 6)``: original h, w, crop top, left, target h, w (SDXL-style only).
            controls: ``(B, 8)`` controls (``diffusion.models.conditioning.CONTROL_FIELDS``; disentangled only).
            control_dropped: ``(B,)`` bool, rows that get the learned null control (disentangled only).
            noise_level: ``(B,)`` or scalar noise level in ``[0, 1]``, 1 = pure noise (disentangled only).

        Returns:
            The network output, same shape as ``x``.
        """
        added = None
        if self.uses_added_conditioning:
            if text_pooled is None or time_ids is None:
                raise ValueError('this UNet uses SDXL added conditioning: pass text_pooled (B, D) and time_ids (B, 6)')
            added = {'text_embeds': text_pooled, 'time_ids': time_ids}
        class_labels = None
        if self.uses_controls:  # diffusers adds an `identity` class embedding to the time embedding
            class_labels = self._control_condition(x, text_pooled, controls, control_dropped, noise_level)
        mask = None if text_mask is None else text_mask.to(x.dtype)
        return self.unet(x, t, encoder_hidden_states=text_hidden, encoder_attention_mask=mask,
                         class_labels=class_labels, added_cond_kwargs=added, return_dict=False)[0]

    def _control_condition(self, x: Tensor, text_pooled: Tensor | None, controls: Tensor | None,
                           control_dropped: Tensor | None, noise_level: Tensor | None) -> Tensor:
        """Gated control embedding (+ ungated pooled text if kept), ``(B, time_embed_dim)``."""
        if controls is None or noise_level is None:
            raise ValueError('disentangled conditioning: pass controls (B, 8) and noise_level (B,)')
        n = x.shape[0]
        level = noise_level.to(x.device).reshape(-1).expand(n)  # (B,)
        dropped = None if control_dropped is None else control_dropped.to(x.device)
        emb = self.control_embedding(controls.to(x.device), level, dropped)  # (B, D)
        if self.pooled_projection is not None:
            if text_pooled is None:
                raise ValueError('this UNet keeps the pooled text in its time embedding: pass text_pooled (B, D)')
            emb = emb + self.pooled_projection(text_pooled.to(emb.dtype))
        return emb.to(x.dtype)

    @staticmethod
    def fsdp_wrap_fn(module: nn.Module) -> bool:
        """Composer FSDP auto-wrap policy: one FSDP unit per transformer and resnet block."""
        return isinstance(module, (Transformer2DModel, ResnetBlock2D))

    @staticmethod
    def activation_checkpointing_fn(module: nn.Module) -> bool:
        """Composer activation-checkpointing policy: the same blocks as :meth:`fsdp_wrap_fn`."""
        return isinstance(module, (Transformer2DModel, ResnetBlock2D))


# =============================================================================================
# Builder
# =============================================================================================


def _load_pretrained(name_or_path: str) -> UNet2DConditionModel:
    """Load a UNet from a diffusers folder (or its ``unet/`` subfolder) or a hub name."""
    local = os.path.isdir(name_or_path)
    subfolders = ['unet'] if local and os.path.isdir(os.path.join(name_or_path, 'unet')) else [None]
    if not local:
        subfolders = ['unet', None]
    errors = []
    for subfolder in subfolders:
        try:
            return UNet2DConditionModel.from_pretrained(name_or_path, subfolder=subfolder)
        except (OSError, ValueError) as err:  # diffusers raises OSError / EnvironmentError when not found
            errors.append(f'{subfolder or "."}: {err}')
    raise RuntimeError(f'could not load UNet2DConditionModel {name_or_path!r} (tried subfolders '
                       f'{[s or "." for s in subfolders]}). No model hub is reachable offline: pass a local '
                       f'diffusers folder. Details: {" | ".join(errors)}')


ATTENTION_BACKENDS = {
    'sdpa': "sdpa: acts (torch scaled_dot_product_attention: fused flash / memory-efficient kernels on GPU, "
            "a fused flash kernel on CPU)",
    'xformers': 'xformers: acts (memory-efficient attention kernels on CUDA)',
    'vanilla': 'vanilla: explicit softmax(QK^T)V matmuls (the unfused baseline the benches compare against)',
}


def _set_attention(unet: UNet2DConditionModel, attention: str) -> None:
    if attention == 'sdpa':
        unet.set_attn_processor(AttnProcessor2_0())
    elif attention == 'vanilla':
        unet.set_attn_processor(AttnProcessor())
    elif attention == 'xformers':
        if not torch.cuda.is_available():
            raise RuntimeError("attention='xformers' needs CUDA (xFormers' memory-efficient kernels have no CPU "
                               "implementation); use attention='sdpa' on this machine")
        unet.enable_xformers_memory_efficient_attention()
    else:
        raise ValueError(f"unknown attention backend {attention!r}; expected one of {sorted(ATTENTION_BACKENDS)}")
    log.info('UNet attention: %s', ATTENTION_BACKENDS[attention])


def build_unet(preset: str = 'mini-s', pretrained: str | None = None, attention: str = 'sdpa',
               gradient_checkpointing: bool = False, device: str | torch.device | None = None,
               conditioning: str = 'auto', keep_pooled_text: bool = False, control_feature_dim: int = 64,
               control_gate_end: float | dict[str, float] = 1.0, **overrides: Any) -> UNetBackbone:
    """Build a UNet backbone from a named preset or a pretrained diffusers checkpoint.

    Args:
        preset: One of :data:`PRESETS` (``sd2-base``, ``sdxl-base``, ``mini-s``, ``mini-l``).
        pretrained: A local diffusers folder (model or pipeline) or hub name; the preset is then
            ignored and any ``overrides`` must agree with the loaded config.
        attention: ``'sdpa'`` (PyTorch scaled-dot-product attention), ``'xformers'`` (CUDA only) or
            ``'vanilla'`` (unfused matmul-softmax-matmul, the baseline for benchmarks).
        gradient_checkpointing: Enable diffusers' gradient checkpointing.
        device: Device to create the parameters on (``'meta'`` builds without memory).
        conditioning: ``auto`` (the preset's own form), ``none``, ``sdxl_summed`` (the SDXL baseline on any
            preset) or ``disentangled`` (gated control embedding; see :class:`UNetBackbone`).
        keep_pooled_text: ``disentangled`` only: also add the pooled text (ungated, through an MLP) to the time
            embedding; by default text acts through cross-attention only.
        control_feature_dim: Sinusoidal features per control scalar (and the summed form's
            ``addition_time_embed_dim`` when the preset has none).
        control_gate_end: Noise level from which the control gate is zero, for all groups or per group
            (``{size: 0.5, crop: 1.0}``; see ``diffusion.models.conditioning``).
        **overrides: ``UNet2DConditionModel`` config keys (e.g. ``cross_attention_dim``,
            ``sample_size``), plus ``pooled_text_dim`` for SDXL-style presets.

    Returns:
        The wrapped UNet.
    """
    pooled_dim = overrides.get('pooled_text_dim') or PRESETS[preset]().get('pooled_text_dim') \
        if preset in PRESETS else None
    if pretrained is not None:
        unet = _load_pretrained(pretrained)
        clash = {k: (v, unet.config.get(k)) for k, v in overrides.items()
                 if k != 'pooled_text_dim' and unet.config.get(k) != v and not _same(unet.config.get(k), v)}
        if clash:
            raise ValueError(f'pretrained UNet {pretrained!r} disagrees with overrides (wanted, loaded): {clash}')
        mode = _pretrained_conditioning(unet, conditioning)
    else:
        config = unet_config(preset, conditioning=conditioning, control_feature_dim=control_feature_dim, **overrides)
        mode = resolve_conditioning(config, conditioning)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            unet = UNet2DConditionModel(**config)
    _set_attention(unet, attention)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    backbone = UNetBackbone(unet, mode, *_control_modules(unet, mode, keep_pooled_text, control_feature_dim,
                                                           control_gate_end, pooled_dim, device))
    backbone.attention_backend = ATTENTION_BACKENDS[attention]
    log.info('UNet %s: %.1fM parameters', pretrained or preset, sum(p.numel() for p in unet.parameters()) / 1e6)
    return backbone


def _pretrained_conditioning(unet: UNet2DConditionModel, conditioning: str) -> str:
    """Resolve ``conditioning`` for a loaded UNet; ``disentangled`` gives it an ``identity`` class embedding."""
    mode = resolve_conditioning(dict(unet.config), conditioning)
    current = resolve_conditioning(dict(unet.config), 'auto')
    if mode == 'disentangled' and current == 'none' and unet.class_embedding is None:
        unet.class_embedding = nn.Identity()  # adds our gated control embedding to the time embedding
        unet.register_to_config(class_embed_type='identity')
    elif mode != current and not (mode == 'disentangled' and unet.config.class_embed_type == 'identity'):
        raise ValueError(f'pretrained UNet uses {current!r} conditioning; switching it to {mode!r} is only '
                         f'supported from none to disentangled')
    return mode


def _control_modules(unet: UNet2DConditionModel, mode: str, keep_pooled_text: bool, feature_dim: int,
                     gate_end: float | dict[str, float], pooled_dim: int | None,
                     device: str | torch.device | None) -> tuple[ControlEmbedding | None, nn.Module | None]:
    """The disentangled form's control embedding and optional pooled-text projection (else ``None``s)."""
    if mode != 'disentangled':
        if keep_pooled_text:
            raise ValueError('keep_pooled_text applies to conditioning: disentangled only (sdxl_summed always '
                             'uses the pooled text)')
        return None, None
    width = unet.time_embedding.linear_2.out_features  # diffusers' time-embedding width
    with torch.device(device) if device is not None else contextlib.nullcontext():
        control = ControlEmbedding(width, feature_dim=feature_dim, gate_end=gate_end)
        pooled = None
        if keep_pooled_text:
            pooled_in = pooled_dim or unet.config.cross_attention_dim
            pooled = nn.Sequential(nn.Linear(pooled_in, width), nn.SiLU(), nn.Linear(width, width))
    return control, pooled


def _same(a: Any, b: Any) -> bool:
    """Config values compare equal up to list/tuple."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


backbones.register('unet', func=build_unet)
