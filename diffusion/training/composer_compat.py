"""Every patch of a composer or streaming internal, in one place, pinned to the versions it was written against.

Composer and streaming are used through their public APIs everywhere else. Where their behaviour has to change
and no public hook exists, the change lives here, is installed explicitly (never at import), and
:func:`check_pins` fails loudly when an installed version differs from the one each patch was read against
(``tests/test_composer_compat.py``): read the new version's code, re-check the patch, then move the pin.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from composer.algorithms.ema import ema as ema_module
from composer.core import precision as precision_module
from composer.distributed import dist_strategy, prepare_distributed
from composer.trainer import trainer as trainer_module
from composer.utils import checkpoint as composer_checkpoint
from composer.utils import dist as composer_dist

__all__ = ['PINNED', 'check_pins', 'install_atomic_checkpoint_writes', 'install_node_signal_files',
           'install_cpu_fsdp', 'install_fsdp_ema_context', 'emulate_gpu_precision_on_cpu', 'gpu_precision_emulated',
           'EMULATE_ENV']

# The versions every patch below was read against.
PINNED = {'mosaicml': '0.32.1', 'mosaicml-streaming': '0.12.0'}


def check_pins() -> None:
    """Raise when composer or streaming is not the version the patches here were written against."""
    from importlib.metadata import version
    wrong = {name: version(name) for name, want in PINNED.items() if version(name) != want}
    if wrong:
        raise RuntimeError(f'diffusion/training/composer_compat.py patches internals of {PINNED}, installed: '
                           f'{wrong}; re-read the patched functions in the new version and update PINNED')


# =============================================================================================
# Atomic checkpoint files
# =============================================================================================
_original_write = composer_checkpoint._write_checkpoint_file


def _atomic_write_checkpoint_file(state_dict: dict[str, Any], filename: str) -> None:
    """Composer's writer, into ``.tmp-<pid>-<name>`` beside the target, then renamed over it in one step."""
    # The prefix keeps the extension (composer picks tar / compression from it).
    tmp = os.path.join(os.path.dirname(filename), f'.tmp-{os.getpid()}-{os.path.basename(filename)}')
    try:
        _original_write(state_dict, tmp)
        with open(tmp, 'rb') as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def install_atomic_checkpoint_writes() -> None:
    """Make composer's local checkpoint files atomic (idempotent; composer calls the writer by module name)."""
    composer_checkpoint._write_checkpoint_file = _atomic_write_checkpoint_file


# =============================================================================================
# Autoresume with a checkpoint folder shared by several nodes
# =============================================================================================
_original_signal_file_name = composer_dist.get_node_signal_file_name


def _node_signal_file_name(rng: Any = None) -> str:
    """Composer's signal file name (rank 0's, the same on every rank) plus this node's own rank.

    The ranks of one node still agree on the name (they wait on it together); two nodes no longer write and
    delete the same file when the folder is shared.
    """
    return f'{_original_signal_file_name(rng)}-of-node{composer_dist.get_node_rank()}'


def install_node_signal_files() -> None:
    """Give each node its own autoresume signal file (idempotent; composer calls ``dist.<name>`` by module)."""
    composer_dist.get_node_signal_file_name = _node_signal_file_name


# =============================================================================================
# Composer's FSDP (FSDP1, ``parallelism_config={'fsdp': ...}``) on a CPU over gloo
# =============================================================================================
class _CudaSeenByDistStrategy:
    """``torch.cuda`` as ``composer.distributed.dist_strategy`` sees it: ``current_device()`` is the CPU when no
    CUDA device is visible (there composer's own call would raise), else CUDA's answer; the rest is ``torch.cuda``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> Any:
        return torch.cuda.current_device() if torch.cuda.is_available() else torch.device('cpu')


class _TorchSeenByDistStrategy:
    """The ``torch`` module with :class:`_CudaSeenByDistStrategy` as its ``cuda``."""
    cuda = _CudaSeenByDistStrategy()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def install_cpu_fsdp() -> None:
    """Let composer's FSDP run on a CPU (gloo), as torch 2.7's ``FullyShardedDataParallel(device_id=cpu)`` does.

    ``prepare_fsdp_module`` passes ``device_id=torch.cuda.current_device()`` to every FSDP wrap, which raises
    without a CUDA device; it is its only CUDA-only step for a model built on a real device (the other,
    ``to_empty(device='cuda:...')``, runs only for parameters on the meta device). The module's ``torch`` is
    replaced by a view whose ``cuda.current_device()`` answers the CPU when no CUDA device is visible: with a GPU
    nothing changes. Idempotent.
    """
    dist_strategy.torch = _TorchSeenByDistStrategy()


# =============================================================================================
# Composer's EMA with FSDP children (a ComposerModel whose backbone is the FSDP unit)
# =============================================================================================
def _full_params_context(model: torch.nn.Module) -> Any:
    """All parameters of every FSDP module inside ``model``, gathered (and written back) for the block."""
    from composer.utils import misc
    from torch.distributed.fsdp import FullyShardedDataParallel
    if misc.is_model_fsdp(model):
        return FullyShardedDataParallel.summon_full_params(model, writeback=True)
    return contextlib.nullcontext()


def install_fsdp_ema_context() -> None:
    """Make composer's EMA gather full parameters of any ComposerModel with FSDP children. Idempotent.

    ``composer.algorithms.ema.ema.get_model_context_manager`` (used by ``compute_ema`` and by every
    ``EMAParameters`` method: creating the copy, swapping it in and out, moving it to the device) calls
    ``model.module.summon_full_params``: it assumes the FSDP unit is the child named ``module``.
    ``LatentDiffusion`` shards ``backbone`` (and leaves the frozen encoders whole), so EMA raised AttributeError
    at its start. ``FullyShardedDataParallel.summon_full_params(model)`` gathers every FSDP module under the
    root, whatever its name (for composer's ``module`` child the same thing).
    """
    ema_module.get_model_context_manager = _full_params_context


# =============================================================================================
# Composer's amp_bf16 precision on a CPU (tests): CUDA autocast's dtype rules, emulated
# =============================================================================================
EMULATE_ENV = 'DIFFUSION_EMULATE_GPU_PRECISION'
_original_precision_context = trainer_module.get_precision_context
_original_validate_precision = precision_module._validate_precision


def _validate_precision_emulated(precision: Any, device: Any) -> None:
    from composer.core import Precision
    from composer.devices import DeviceCPU
    if isinstance(device, DeviceCPU) and Precision(precision) == Precision.AMP_BF16:
        return
    _original_validate_precision(precision, device)


@contextlib.contextmanager
def _precision_context_emulated(precision: Any, *args: Any, **kwargs: Any) -> Iterator[None]:
    from composer.core import Precision
    if Precision(precision) != Precision.AMP_BF16 or torch.cuda.is_available():
        with _original_precision_context(precision, *args, **kwargs):
            yield
        return
    with cuda_autocast_on_cpu(torch.bfloat16):
        yield


def cuda_autocast_on_cpu(dtype: torch.dtype) -> Any:
    """CPU autocast in ``dtype`` with CUDA autocast's op lists on top (``diffusion/training/autocast_rules.py``)."""
    from diffusion.training.autocast_rules import cuda_autocast_rules
    return cuda_autocast_rules(dtype)


def emulate_gpu_precision_on_cpu() -> None:
    """Let a Trainer on a CPU accept ``precision: amp_bf16`` and run it as CUDA's bf16 autocast would. Idempotent.

    For tests: recipes keep their own ``precision: amp_bf16`` in CPU runs, and a dtype mismatch of the GPU path
    (e.g. an fp32 expert output added into a bf16 tensor) fails on the CPU too. Composer refuses anything but fp32
    on a CPU (``_validate_precision`` in the Trainer and in its FSDP/FSDP2 preparation) and its precision context
    does nothing there. Here the check lets ``amp_bf16`` through on a CPU (``amp_fp16`` / ``amp_fp8`` still
    fail: no grad scaler / no Transformer Engine on a CPU) and the Trainer's ``get_precision_context`` enters
    :func:`cuda_autocast_on_cpu` for it, as does ``composer.core.precision.get_precision_context`` (the sample-grid
    callback samples under it). FSDP's ``mixed_precision: DEFAULT`` then holds bf16 parameter copies for
    the forward, as on a GPU. Not for training runs: a CPU's bf16 speed-up is ``cpu_bf16_autocast``'s job.

    ``build_trainer`` installs it when the environment variable ``DIFFUSION_EMULATE_GPU_PRECISION=1`` is set
    (also in subprocesses such as ``composer -n 2 run.py ...``); a test in the same process may call it itself.
    """
    for module in (trainer_module, dist_strategy, prepare_distributed):
        module._validate_precision = _validate_precision_emulated
    trainer_module.get_precision_context = _precision_context_emulated
    precision_module.get_precision_context = _precision_context_emulated  # what callbacks sample under


def gpu_precision_emulated() -> bool:
    """Whether this process asked for :func:`emulate_gpu_precision_on_cpu` through the environment."""
    return os.environ.get(EMULATE_ENV, '') not in ('', '0')
