"""``torch.compile`` of the denoising backbone only (the part that trains and does most of the FLOPs)."""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Optional

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from diffusion import registry

log = logging.getLogger(__name__)

__all__ = ['CompileBackbone', 'apply_compile_backbone', 'compile_acts']


def compile_acts(backend: str) -> tuple[bool, str]:
    """Whether compiling with ``backend`` can produce fused kernels here, and why (for the log line)."""
    if backend != 'inductor':
        return True, f'backend {backend!r} (graph capture only, no code generation)'
    if torch.cuda.is_available():
        return True, 'inductor generates Triton kernels on the GPU'
    compiler = shutil.which(os.environ.get('CXX', 'g++')) or shutil.which('c++')
    if compiler is None:
        return False, 'inductor needs a C++ compiler on CPU and none is on PATH'
    return True, f'inductor generates C++/OpenMP kernels on CPU with {compiler}'


def apply_compile_backbone(model: Any, backend: str = 'inductor', mode: Optional[str] = None,
                           dynamic: Optional[bool] = None, fullgraph: bool = False) -> torch.nn.Module:
    """Compile ``model.backbone`` in place with ``nn.Module.compile``.

    In place (not ``model.backbone = torch.compile(...)``) so parameter names and checkpoints stay the same as an
    uncompiled run's. Code that must not trigger recompiles (the sample-image callback, FLOP counting) runs under
    ``torch.compiler.set_stance('force_eager')``.
    """
    backbone = model.backbone
    backbone.compile(backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
    return backbone


class CompileBackbone(Algorithm):
    """Compile the backbone with ``torch.compile`` at ``Event.INIT`` (YAML: ``algorithms: {compile_backbone: {}}``).

    Args:
        backend: ``torch.compile`` backend (``inductor``; ``aot_eager`` / ``eager`` capture graphs without
            generating code, e.g. to check a model compiles).
        mode: ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``).
        dynamic: ``torch.compile``'s ``dynamic`` flag.
        fullgraph: Fail on graph breaks instead of falling back to Python.
    """

    def __init__(self, backend: str = 'inductor', mode: Optional[str] = None, dynamic: Optional[bool] = None,
                 fullgraph: bool = False) -> None:
        self.backend, self.mode, self.dynamic, self.fullgraph = backend, mode, dynamic, fullgraph

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        acts, why = compile_acts(self.backend)
        if not acts:
            log.warning('compile_backbone: does NOT act on this machine (%s); the backbone runs eagerly', why)
            return
        apply_compile_backbone(state.model, self.backend, self.mode, self.dynamic, self.fullgraph)
        log.info('compile_backbone: acts (%s)', why)


registry.algorithms.register('compile_backbone', func=CompileBackbone)
