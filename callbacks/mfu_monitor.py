"""Throughput and model-FLOPs utilisation (MFU) through composer's ``SpeedMonitor``."""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
from composer.callbacks import SpeedMonitor
from composer.callbacks.speed_monitor import get_gpu_flops_available
from composer.core import State
from composer.loggers import Logger

from diffusion import registry
from diffusion.models.wrapping import unwrap

log = logging.getLogger(__name__)

__all__ = ['MFUMonitor', 'measure_matmul_peak', 'count_step_flops', 'batch_size_of']


def measure_matmul_peak(seconds: float = 1.0, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of square ``n x n`` matmuls on this CPU, run for about ``seconds`` (the denominator of CPU MFU).

    CPUs have no data-sheet peak composer knows, and what a given box reaches depends on its cores, vector units
    and load; a dense matmul is the fastest thing a training step can do, so MFU is reported against it.
    """
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool and caches
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n ** 3 * count / elapsed


def batch_size_of(batch: Any) -> int:
    """Number of samples in a dict batch (the first tensor's or list's length)."""
    for value in batch.values():
        if isinstance(value, (torch.Tensor, list, tuple)):
            return len(value)
    raise ValueError('cannot tell the batch size: no tensor or list in the batch')


def _first(batch: dict[str, Any], k: int) -> dict[str, Any]:
    return {key: v[:k] if isinstance(v, (torch.Tensor, list, tuple)) else v for key, v in batch.items()}


def count_step_flops(model: Any, batch: dict[str, Any], samples: int = 1) -> int:
    """FLOPs of one training step (forward of every part, loss, backward of the trainable ones) on ``samples``.

    Counted once with ``torch.utils.flop_counter.FlopCounterMode`` on the first ``samples`` rows of ``batch``.
    Gradients are taken with ``torch.autograd.grad`` (nothing accumulates into ``.grad``), the RNG state is
    restored afterwards (the run's noise draws are unchanged), and any ``torch.compile`` is bypassed.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    params = [p for p in model.parameters() if p.requires_grad]
    small = _first(batch, samples)
    counter = FlopCounterMode(display=False)
    # SDPA's math backend: the fused CPU kernels have no FLOP formula, so their attention would count as 0.
    with torch.random.fork_rng(), torch.compiler.set_stance('force_eager'), sdpa_kernel(SDPBackend.MATH), counter:
        loss = model.loss(model(small), small)
        torch.autograd.grad(loss, params, allow_unused=True)
    return int(counter.get_total_flops())


class MFUMonitor(SpeedMonitor):
    """Composer's :class:`~composer.callbacks.SpeedMonitor`, fed with the model's FLOPs and the device's peak.

    At the first training batch the FLOPs of one sample's training step are counted (:func:`count_step_flops`)
    and the model gets the ``flops_per_batch`` callable the speed monitor looks for. The peak is ``peak_flops``
    when given (FLOP/s per device, e.g. 312e12 for an A100 in bf16), else composer's table for known GPUs, else
    (on a CPU) a one-second fp32 matmul probe (:func:`measure_matmul_peak`).

    Logs everything ``SpeedMonitor`` logs (``throughput/samples_per_sec``, ``throughput/device/flops_per_sec``,
    ``throughput/device/mfu``, ...), plus ``throughput/flops_per_sample`` and ``throughput/device/peak_flops``
    once.

    Args:
        window_size: Batches averaged per throughput figure (composer's ``window_size``).
        peak_flops: Device peak FLOP/s; ``None`` finds it as above.
        probe_seconds: Length of the CPU matmul probe.
        time_unit: Unit of the ``time/*`` metrics (composer's).
    """

    def __init__(self, window_size: int = 10, peak_flops: Optional[float] = None, probe_seconds: float = 1.0,
                 time_unit: str = 'seconds') -> None:
        super().__init__(window_size=window_size, gpu_flops_available=peak_flops, time_unit=time_unit)
        self.probe_seconds = probe_seconds
        self.flops_per_sample: Optional[int] = None

    def init(self, state: State, logger: Logger) -> None:
        if self.gpu_flops_available is None:
            self.gpu_flops_available = get_gpu_flops_available(state) if torch.cuda.is_available() else 0
        if not self.gpu_flops_available and not torch.cuda.is_available():
            self.gpu_flops_available = measure_matmul_peak(self.probe_seconds)
            log.info('mfu_monitor: CPU fp32 matmul peak measured at %.1f GFLOP/s', self.gpu_flops_available / 1e9)

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.flops_per_sample is not None:
            return
        model = unwrap(state.model)
        self.flops_per_sample = count_step_flops(model, state.batch)
        per_sample = self.flops_per_sample
        model.flops_per_batch = lambda batch: per_sample * batch_size_of(batch)
        logger.log_metrics({'throughput/flops_per_sample': float(per_sample),
                            'throughput/device/peak_flops': float(self.gpu_flops_available or 0)})
        log.info('mfu_monitor: %.3f GFLOP per training sample, peak %.1f GFLOP/s', per_sample / 1e9,
                 (self.gpu_flops_available or 0) / 1e9)


registry.callbacks.register('mfu_monitor', func=MFUMonitor)
