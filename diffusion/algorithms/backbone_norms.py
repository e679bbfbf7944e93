"""Composer's low-precision LayerNorm / GroupNorm on the trainable backbone only (the YAML names stay
``low_precision_layernorm`` and ``low_precision_groupnorm``; these replace composer's algorithms in the registry).

Composer's algorithms replace every ``nn.LayerNorm`` / ``nn.GroupNorm`` of the whole model by module surgery and
hand the new modules' parameters to the optimizer. In a ``LatentDiffusion`` that includes the frozen text encoder
and VAE: their new norm parameters are created trainable and join the optimizer's group (the encoders slowly
change under training, and every checkpoint carries them as trained weights); with more than one parameter group
(MicroDiT's experts at their own learning rate) the surgery cannot place the encoders' parameters in any group and
raises ``Parameter groups [-1, -1] are not in the optimizer`` at start-up. The references apply the norms to the
denoiser only (mosaicml/diffusion ``attribute: unet``, micro_diffusion ``model.dit``); so do these, through
composer's public ``apply_low_precision_layernorm`` / ``apply_low_precision_groupnorm`` on ``model.backbone``.
A model without a ``backbone`` (the autoencoder's own training) gets composer's whole-model behaviour.
"""
from __future__ import annotations

from typing import Any

import torch
from composer.algorithms import LowPrecisionGroupNorm, LowPrecisionLayerNorm
from composer.algorithms.low_precision_groupnorm import apply_low_precision_groupnorm
from composer.algorithms.low_precision_layernorm import apply_low_precision_layernorm
from composer.core import Event, State
from composer.loggers import Logger

from diffusion import registry
from diffusion.models.wrapping import unwrap

__all__ = ['BackboneLowPrecisionLayerNorm', 'BackboneLowPrecisionGroupNorm', 'trainable_part']


def trainable_part(model: Any) -> torch.nn.Module:
    """The module the norms go into: ``model.backbone`` when the model has one, else the model itself."""
    model = unwrap(model)
    backbone = getattr(model, 'backbone', None)
    return model if backbone is None else backbone


class BackboneLowPrecisionLayerNorm(LowPrecisionLayerNorm):
    """Composer's :class:`~composer.algorithms.LowPrecisionLayerNorm` applied to ``model.backbone`` only."""

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        apply_low_precision_layernorm(model=trainable_part(state.model), optimizers=state.optimizers,
                                      precision=state.precision)


class BackboneLowPrecisionGroupNorm(LowPrecisionGroupNorm):
    """Composer's :class:`~composer.algorithms.LowPrecisionGroupNorm` applied to ``model.backbone`` only."""

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        apply_low_precision_groupnorm(model=trainable_part(state.model), optimizers=state.optimizers,
                                      precision=state.precision)


registry.algorithms.register('low_precision_layernorm', func=BackboneLowPrecisionLayerNorm)
registry.algorithms.register('low_precision_groupnorm', func=BackboneLowPrecisionGroupNorm)
