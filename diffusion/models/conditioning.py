"""Control-metadata conditioning shared by every backbone, and the pieces of resolution transfer.

Berrada et al. 2024 ("On Improved Conditioning Mechanisms and Pre-training Strategies for Diffusion Models",
arXiv:2411.03177) report that summing control metadata (original size, crop, target size, flip) into the
timestep / pooled-text embedding, as SDXL's micro-conditioning does (Podell et al. 2023, Sec. 2.2), lets the
controls leak into *what* is drawn; they disentangle semantics (attention only) from control (the adaptive
normalisation path only, faded in over the noise level). No code of theirs is public; the formulations below are
our own candidates, named as such:

* :class:`ControlEmbedding`: sinusoidal features of each control scalar + one MLP per control group, and a
  learned null embedding per group used for rows whose controls were dropped (so guidance can act on control
  separately, as in InstructPix2Pix's compositional guidance, Brooks et al. 2023, eq. 3).
* :func:`control_gate`: ``alpha(u) = cos^2(pi/2 * min(1, u / u_end))`` with ``u`` the noise level in ``[0, 1]``
  (1 = pure noise), so the gate is exactly zero at pure noise and one at no noise.
* ``noise_level(t_in)`` of each schedule (``diffusion/schedules.py``) gives ``u`` from the network's time input.
* :func:`noisy_replicate_padding`: padding token states replaced by cyclic copies of the real ones plus noise.
* :func:`resample_position_table`: bicubic resampling of a learned ``(1, H*W, D)`` position table (ViT / DeiT
  fine-tuning at a higher resolution, Touvron et al. 2021).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

__all__ = ['CONTROL_FIELDS', 'CONTROL_GROUPS', 'control_vector', 'batch_controls', 'generation_controls',
           'ControlEmbedding', 'control_gate', 'noisy_replicate_padding',
           'resample_position_table', 'CONDITIONING_MODES']

CONDITIONING_MODES = ('none', 'sdxl_summed', 'disentangled')

# Columns of the (B, 8) control vector: sizes and offsets in pixels, flip 0/1, aspect ratio as ln(h / w) of the
# target (the bucket the image was trained at).
CONTROL_FIELDS = ('original_h', 'original_w', 'crop_top', 'crop_left', 'target_h', 'target_w', 'flip',
                  'log_aspect')
NUM_CONTROLS = len(CONTROL_FIELDS)
# Groups gated separately: [T] summaries of the paper say low-level controls (size, resolution) should act at low
# noise only and high-level ones (crop, flip) earlier, so each group has its own gate end ``u_end``.
CONTROL_GROUPS: dict[str, tuple[int, ...]] = {'size': (0, 1, 4, 5, 7), 'crop': (2, 3, 6)}

# =============================================================================================
# The control vector
# =============================================================================================


def control_vector(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor,
                   flip: Optional[Tensor] = None) -> Tensor:
    """Stack the dataset's control fields into a ``(B, 8)`` float tensor (see :data:`CONTROL_FIELDS`).

    Args:
        original_size: ``(B, 2)`` height, width of the source image.
        crop_top_left: ``(B, 2)`` crop offset in the resized image.
        target_size: ``(B, 2)`` height, width of the training crop.
        flip: ``(B,)`` 1 where the image was mirrored (default: none were).
    """
    n = original_size.shape[0]
    target = target_size.float()
    flip = torch.zeros(n) if flip is None else flip.reshape(n).float()
    log_aspect = (target[:, 0].clamp(min=1) / target[:, 1].clamp(min=1)).log()  # (B,)
    return torch.cat([original_size.float(), crop_top_left.float().to(target.device), target,
                      flip.to(target.device)[:, None], log_aspect[:, None]], dim=1)  # (B, 8)


def batch_controls(batch: Mapping[str, Any]) -> Optional[Tensor]:
    """The ``(B, 8)`` controls of a dataloader batch, or None when it carries no size fields."""
    if 'original_size' not in batch:
        return None
    return control_vector(batch['original_size'], batch['crop_top_left'], batch['target_size'], batch.get('flip'))


def generation_controls(n: int, height: int, width: int, overrides: Optional[Mapping[str, Any]] = None) -> Tensor:
    """Controls for sampling: by default a whole, uncropped, unflipped picture of the output size.

    Args:
        n: Batch size.
        height: Output height in pixels.
        width: Output width in pixels.
        overrides: Any of ``original_size``, ``crop_top_left``, ``target_size`` (pairs) and ``flip`` (0/1), to
            ask for other metadata than the output size (the leakage study varies these).
    """
    fields = {'original_size': (height, width), 'crop_top_left': (0, 0), 'target_size': (height, width), 'flip': 0}
    unknown = set(overrides or {}) - set(fields)
    if unknown:
        raise ValueError(f'unknown control field(s) {sorted(unknown)}; expected some of {sorted(fields)}')
    fields.update(overrides or {})
    pair = {k: torch.tensor([list(fields[k])], dtype=torch.float32).expand(n, 2)
            for k in ('original_size', 'crop_top_left', 'target_size')}
    return control_vector(**pair, flip=torch.full((n,), float(fields['flip'])))


# =============================================================================================
# Embedding, gate and noise level
# =============================================================================================


def control_gate(noise_level: Tensor, u_end: float = 1.0) -> Tensor:
    """Cosine fade-in of the control embedding over the noise level (our candidate form).

    ``alpha(u) = cos^2(pi/2 * min(1, u / u_end)) = sin^2(pi/2 * (1 - min(1, u / u_end)))``, written with a sine
    so that it is exactly 0 (not 1e-15) at ``u >= u_end``: at pure noise the control cannot move the prediction.

    Args:
        noise_level: ``(B,)`` noise levels in ``[0, 1]``, 1 = pure noise.
        u_end: Noise level from which the gate is zero (1 = only at pure noise).
    """
    if not 0.0 < u_end <= 1.0:
        raise ValueError(f'control gate end u_end must be in (0, 1], got {u_end}')
    u = (noise_level.float() / u_end).clamp(0.0, 1.0)
    return torch.sin(math.pi / 2 * (1.0 - u))**2


class ControlEmbedding(nn.Module):
    """Embed the ``(B, 8)`` controls into the adaptive-normalisation width, one MLP and one gate per group.

    ``c(m, u) = sum_g alpha(u; u_end_g) * (null_g if dropped else MLP_g(sinusoid(m_g)))``. Each scalar gets
    ``feature_dim`` sinusoidal features (DDPM / SDXL's Fourier features, via diffusers); the null embeddings start
    at zero and are learned from rows whose controls were dropped.

    Args:
        out_dim: Width of the embedding (the UNet's time-embedding width, or the transformer's adaLN width).
        feature_dim: Sinusoidal features per control scalar (SDXL uses 256).
        gate_end: ``u_end`` of every group, or a mapping group -> ``u_end`` (groups: :data:`CONTROL_GROUPS`).
    """

    def __init__(self, out_dim: int, feature_dim: int = 64, gate_end: Union[float, Mapping[str, float]] = 1.0):
        super().__init__()
        if isinstance(gate_end, Mapping):
            unknown = set(gate_end) - set(CONTROL_GROUPS)
            if unknown:
                raise ValueError(f'control gate_end: unknown group(s) {sorted(unknown)}; '
                                 f'groups: {list(CONTROL_GROUPS)}')
            ends = {g: float(gate_end.get(g, 1.0)) for g in CONTROL_GROUPS}
        else:
            ends = dict.fromkeys(CONTROL_GROUPS, float(gate_end))
        for end in ends.values():
            control_gate(torch.zeros(1), end)  # validates the range
        self.feature_dim, self.gate_end = feature_dim, ends
        self.mlps = nn.ModuleDict({g: nn.Sequential(nn.Linear(len(idx) * feature_dim, out_dim), nn.SiLU(),
                                                    nn.Linear(out_dim, out_dim))
                                   for g, idx in CONTROL_GROUPS.items()})
        self.null = nn.ParameterDict({g: nn.Parameter(torch.zeros(out_dim)) for g in CONTROL_GROUPS})

    def features(self, values: Tensor) -> Tensor:
        """``(B, K)`` scalars -> ``(B, K * feature_dim)`` sinusoidal features."""
        n, k = values.shape
        emb = get_timestep_embedding(values.reshape(-1), self.feature_dim, flip_sin_to_cos=True,
                                     downscale_freq_shift=0)  # (B*K, F)
        return emb.reshape(n, k * self.feature_dim)

    def forward(self, controls: Tensor, noise_level: Tensor, dropped: Optional[Tensor] = None) -> Tensor:
        """Gated control embedding ``(B, out_dim)``.

        Args:
            controls: ``(B, 8)`` from :func:`control_vector`.
            noise_level: ``(B,)`` in ``[0, 1]``, 1 = pure noise.
            dropped: ``(B,)`` bool, True where the null control replaces the controls.
        """
        if controls.shape[-1] != NUM_CONTROLS:
            raise ValueError(f'controls must be (B, {NUM_CONTROLS}) ({CONTROL_FIELDS}), got {tuple(controls.shape)}')
        dtype = self.null[next(iter(CONTROL_GROUPS))].dtype
        total = 0
        for group, idx in CONTROL_GROUPS.items():
            emb = self.mlps[group](self.features(controls[:, list(idx)].float()).to(dtype))  # (B, D)
            if dropped is not None:
                emb = torch.where(dropped.reshape(-1, 1).bool(), self.null[group].expand_as(emb), emb)
            gate = control_gate(noise_level.reshape(-1), self.gate_end[group]).to(emb)  # (B,)
            total = total + gate[:, None] * emb
        return total


# =============================================================================================
# Text: noisy replicate padding
# =============================================================================================


def noisy_replicate_padding(hidden: Tensor, mask: Tensor, noise_scale: float = 0.0,
                            generator: Optional[torch.Generator] = None) -> Tensor:
    """Fill padding positions with cyclic copies of the real token states, plus Gaussian noise.

    For a caption of ``L`` real tokens (right-padded, as BERT and CLIP tokenizers pad), position ``i >= L``
    receives ``h[(i - L) mod L] + noise_scale * std(h_real) * N(0, 1)``. Summaries of Berrada et al. 2024 name
    "noisy replicate padding" without its details; this is our candidate form. Real positions are unchanged.

    Args:
        hidden: ``(B, S, D)`` token states of the frozen text encoder.
        mask: ``(B, S)``, nonzero at real tokens, which must form a prefix of each row.
        noise_scale: Noise standard deviation relative to the per-caption std of the real token states.
        generator: Random generator of the noise.

    Returns:
        The padded states, same shape and dtype as ``hidden``.
    """
    real = mask.bool()
    n_real = real.long().sum(dim=1).clamp(min=1)  # (B,)
    pos = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, S)
    if bool((real != (pos < n_real[:, None])).any()):
        raise ValueError('noisy_replicate_padding needs right-padded captions (real tokens first)')
    pad = pos >= n_real[:, None]  # (B, S)
    src = torch.where(pad, (pos - n_real[:, None]) % n_real[:, None], pos)  # (B, S)
    out = hidden.gather(1, src[..., None].expand_as(hidden))  # (B, S, D)
    if noise_scale > 0:
        weights = (~pad).to(hidden.dtype)[..., None]  # (B, S, 1)
        count = weights.sum(dim=(1, 2), keepdim=True) * hidden.shape[2]
        mean = (hidden * weights).sum(dim=(1, 2), keepdim=True) / count
        std = (((hidden - mean)**2 * weights).sum(dim=(1, 2), keepdim=True) / count).sqrt()  # (B, 1, 1)
        noise = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=hidden.dtype)
        out = out + pad[..., None].to(hidden.dtype) * noise_scale * std * noise
    return out


# =============================================================================================
# Resolution transfer: learned position tables
# =============================================================================================


def resample_position_table(table: Tensor, new_grid: Sequence[int], old_grid: Optional[Sequence[int]] = None,
                            mode: str = 'bicubic') -> Tensor:
    """Resample a learned ``(1, H*W, D)`` position table to ``new_grid = (h, w)`` (ViT / DeiT style).

    Args:
        table: ``(1, N, D)`` or ``(N, D)`` table over a row-major ``old_grid``.
        new_grid: Target ``(h, w)`` in tokens.
        old_grid: Source ``(H, W)``; default: square ``sqrt(N)``.
        mode: ``F.interpolate`` mode (``bicubic`` or ``bilinear``; ``align_corners=False``).
    """
    squeeze = table.dim() == 2
    table3 = table[None] if squeeze else table  # (1, N, D)
    n, d = table3.shape[1], table3.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f'position table of {n} tokens is not square: pass old_grid')
        old_grid = (side, side)
    h_old, w_old = old_grid
    grid = table3.reshape(1, h_old, w_old, d).permute(0, 3, 1, 2).float()  # (1, D, H, W)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False)  # (1, D, h, w)
    out = grid.permute(0, 2, 3, 1).reshape(1, -1, d).to(table.dtype)  # (1, h*w, D)
    return out[0] if squeeze else out


def adapt_position_entries(module: nn.Module, state_dict: dict[str, Tensor], prefix: str = '') -> list[str]:
    """Make a checkpoint's position embeddings fit ``module`` at another resolution, in place.

    Entries whose name contains ``pos_embed`` and whose shape differs from ``module``'s: a learned table (a
    parameter) is resampled with :func:`resample_position_table`; a fixed table (a buffer, e.g. a sin-cos
    embedding that the module rebuilt for its own grid and interpolation scale) keeps the module's own value.

    Args:
        module: The model being loaded into.
        state_dict: The incoming state dict (changed in place).
        prefix: Prefix of ``module``'s keys in ``state_dict``.

    Returns:
        One line per changed entry, for the log.
    """
    params = dict(module.named_parameters())
    own = {**dict(module.named_buffers()), **params}
    changes = []
    for name, value in own.items():
        key = prefix + name
        if 'pos_embed' not in name or key not in state_dict or state_dict[key].shape == value.shape:
            continue
        old_shape = tuple(state_dict[key].shape)
        if name in params and value.dim() in (2, 3):
            side = math.isqrt(value.shape[-2])
            state_dict[key] = resample_position_table(state_dict[key], (side, value.shape[-2] // side))
            changes.append(f'{name}: learned table resampled {old_shape} -> {tuple(value.shape)}')
        else:
            state_dict[key] = value.detach().clone()
            changes.append(f'{name}: fixed table rebuilt for the new grid {old_shape} -> {tuple(value.shape)}')
    return changes
