"""One log line per speed-up a run uses, saying whether it acts on this hardware.

Composer's own algorithms (low-precision norms, channels-last, EMA) do not say whether they change anything on
the machine at hand; :func:`report_speedups` does, once, after the Trainer is built. The project's algorithms
(``compile_backbone``, ``activation_checkpointing``) log their own line when they apply.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from composer import algorithms as composer_algorithms

from diffusion.models.wrapping import unwrap

log = logging.getLogger(__name__)

__all__ = ['describe_speedups', 'report_speedups']


def _low_precision_line(name: str, precision: str) -> str:
    if precision in ('amp_fp16', 'amp_bf16') and torch.cuda.is_available():
        return f'{name}: acts (norms run in {precision[4:]} under autocast)'
    return (f'{name}: no effect here: it only changes norms under GPU autocast (amp_fp16/amp_bf16), '
            f'this run is {precision} on {"GPU" if torch.cuda.is_available() else "CPU"}')


def describe_speedups(model: Any, algorithms: list[Any], precision: str, device_batch_size: int,
                      microbatch_size: Optional[Any], fsdp: Optional[dict[str, Any]]) -> list[str]:
    """The speed-up lines for a run (see :func:`report_speedups`)."""
    lines = []
    backbone = getattr(model, 'backbone', None)
    attention = getattr(backbone, 'attention_backend', None)
    if attention is not None:
        lines.append(f'attention: {attention}')
    for algo in algorithms:
        if isinstance(algo, composer_algorithms.LowPrecisionGroupNorm):
            lines.append(_low_precision_line('low_precision_groupnorm', precision))
        elif isinstance(algo, composer_algorithms.LowPrecisionLayerNorm):
            lines.append(_low_precision_line('low_precision_layernorm', precision))
        elif isinstance(algo, composer_algorithms.ChannelsLast):
            lines.append('channels_last: acts (conv weights and activations in NHWC; faster where the conv '
                         'kernels prefer it: GPU tensor cores, oneDNN on CPU)')
        elif isinstance(algo, composer_algorithms.EMA):
            lines.append(f'ema: acts on any device (smoothing {algo.smoothing:.6g}, starts at {algo.ema_start}); '
                         'its weights are used for validation, sample grids, generation and export')
    if microbatch_size not in (None, device_batch_size):
        if microbatch_size == 'auto':
            lines.append('gradient accumulation: microbatch size found automatically (GPU only)')
        else:
            steps = -(-device_batch_size // int(microbatch_size))
            lines.append(f'gradient accumulation: acts, {steps} microbatches of {microbatch_size} per device batch '
                         f'of {device_batch_size}')
    if fsdp is not None:
        lines.append('fsdp: acts: the trainable backbone is sharded (wrapped per block), frozen encoders are '
                     'replicated')
    return lines


def report_speedups(trainer: Any, precision: str, device_batch_size: int, microbatch_size: Optional[Any],
                    fsdp: Optional[dict[str, Any]]) -> list[str]:
    """Log (and return) one line per speed-up of a built ``composer.Trainer``."""
    model = unwrap(trainer.state.model)
    lines = describe_speedups(model, list(trainer.state.algorithms), precision, device_batch_size,
                              microbatch_size, fsdp)
    for line in lines:
        log.info('speed-up %s', line)
    return lines
