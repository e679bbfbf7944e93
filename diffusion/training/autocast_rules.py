"""CUDA autocast's dtype rules on CPU, so that the dtype mismatches of the GPU path fail in CPU tests.

CPU and CUDA autocast cast different op lists. Under ``torch.autocast('cuda', torch.bfloat16)`` softmax,
log_softmax, layer_norm, group_norm, norms, sums, ``exp``/``log``/``pow`` and the losses run in fp32 and return
fp32, while CPU autocast leaves them in bf16; matmuls, linear, convs and SDPA run in bf16 on both. Code that
mixes the two (an fp32 router weight times a bf16 expert output, ``index_add`` of the product into a bf16
tensor) works under CPU autocast and raises on the GPU. :func:`cuda_autocast_rules` adds CUDA's rules on top of
CPU autocast::

    from diffusion.training.autocast_rules import cuda_autocast_rules

    with cuda_autocast_rules():                 # torch.autocast('cpu', torch.bfloat16) + CUDA's op lists
        loss = model.loss(model(batch), batch)  # softmax -> fp32, linear -> bf16, as on a GPU
    loss.backward()

    with cuda_autocast_rules(enter_autocast=False):  # only the rules, wherever the code under test enables
        run_code_that_opens_its_own_cpu_autocast()    # CPU autocast itself

Composer refuses ``precision: amp_bf16`` on CPU; a CPU ``Trainer.fit`` keeps ``fp32`` and runs inside
``cuda_autocast_rules()`` to take the bf16 path.

Code that asks whether GPU autocast is on (``torch.is_autocast_enabled()`` without a device, which means CUDA, and
``torch.get_autocast_gpu_dtype()``, as composer's ``low_precision_layernorm``/``groupnorm`` do) gets the CPU
autocast state and dtype inside the block, so such code takes its GPU branch; the two torch functions are
swapped for the block's duration and restored after it.

The rules are looked up when each op is called: they follow the current CPU autocast state and dtype, so a
``torch.autocast('cpu', enabled=False)`` region inside runs untouched, as a disabled CUDA autocast region would.

The op lists are CUDA's in torch 2.7, ``aten/src/ATen/autocast_mode.h`` (installed as
``torch/include/ATen/autocast_mode.h``; policies documented in
https://pytorch.org/docs/2.7/amp.html#cuda-ops-that-can-autocast-to-float32):

- ``AT_FORALL_FP32``: every floating input cast to fp32 (exp, log, pow, rsqrt, layer_norm, group_norm, the
  losses, cdist, logsumexp, the upsample kernels, ...).
- ``AT_FORALL_FP32_SET_OPT_DTYPE`` and the ``norm`` overloads (``fp32_append_dtype``): run with ``dtype=float32``
  when the first argument is a floating tensor and no dtype was given (softmax, log_softmax, sum, prod, cumsum,
  cumprod, vector/matrix norms).
- ``AT_FORALL_LOWER_PRECISION_FP``: inputs cast to the autocast dtype. CPU autocast already covers the matmuls,
  linear, convs and SDPA; the ones only CUDA casts (einsum, mv, addmv, addr, chain_matmul, multi_dot, RNN cells)
  are added here.
- ``AT_FORALL_PROMOTE``: inputs cast to the widest floating input (addcmul, addcdiv, dot, scatter_add, ...).
- ``binary_cross_entropy`` is banned under CUDA autocast and raises here too.

Ops CPU autocast casts and CUDA does not (CPU's ``index_copy`` promotion, ``reflect``/``replicate`` padding,
3-D pools, ``grid_sample``) run with CPU autocast off, in their input dtype as on a GPU.

The rules are applied to the public functions Python code calls (``torch.softmax``, ``Tensor.softmax``,
``F.softmax``, ``x ** 2``, ...) by a :class:`torch.overrides.TorchFunctionMode`. Composite functions written in
Python run their body without the mode, so the few of them that contain a CUDA fp32 op are listed by name
(``F.normalize``, ``F.cross_entropy``, ``F.interpolate``, ``F.softmin``); kernels called from C++ inside other ops
are not seen, but those inherit the dtype of their enclosing op on CUDA as well.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

__all__ = ['cuda_autocast_rules', 'CudaAutocastRules']

# Names of the public functions behind each of CUDA's aten op lists (torch, Tensor, F, torch._C._nn, linalg).
_FP32 = ('acos', 'asin', 'cosh', 'erfinv', 'exp', 'expm1', 'log', 'log10', 'log2', 'log1p', 'reciprocal', 'rsqrt',
         'sinh', 'tan', 'pow', '__pow__', '__rpow__', 'softplus', 'layer_norm', 'native_layer_norm', 'group_norm',
         'frobenius_norm', 'nuclear_norm', 'cosine_similarity', 'poisson_nll_loss', 'cosine_embedding_loss',
         'nll_loss', 'nll_loss2d', 'hinge_embedding_loss', 'kl_div', 'l1_loss', 'smooth_l1_loss', 'huber_loss',
         'mse_loss', 'margin_ranking_loss', 'multilabel_margin_loss', 'soft_margin_loss', 'triplet_margin_loss',
         'multi_margin_loss', 'binary_cross_entropy_with_logits', 'dist', 'pdist', 'cdist', 'renorm', 'logsumexp',
         'upsample_nearest1d', 'upsample_nearest2d', 'upsample_nearest3d', '_upsample_nearest_exact1d',
         '_upsample_nearest_exact2d', '_upsample_nearest_exact3d', 'upsample_linear1d', 'upsample_bilinear2d',
         '_upsample_bilinear2d_aa', 'upsample_trilinear3d', 'upsample_bicubic2d', '_upsample_bicubic2d_aa',
         # Python composites of the above: normalize divides by a norm, cross_entropy is log_softmax + nll_loss,
         # softmin is a softmax, upsample/upsample_nearest/upsample_bilinear call the upsample kernels.
         'normalize', 'cross_entropy', 'softmin', 'upsample', 'upsample_nearest', 'upsample_bilinear')
_FP32_SET_OPT_DTYPE = ('prod', 'softmax', 'log_softmax', 'cumprod', 'cumsum', 'vector_norm', 'matrix_norm', 'sum',
                       'norm')
_LOWER_PRECISION = ('addmv', 'addr', 'einsum', 'mv', 'chain_matmul', 'multi_dot', 'lstm_cell', 'gru_cell',
                    'rnn_tanh_cell', 'rnn_relu_cell')
_PROMOTE = ('addcdiv', 'addcmul', 'atan2', 'bilinear', 'cross', 'dot', 'vdot', 'grid_sample', 'grid_sampler',
            'index_put', 'tensordot', 'scatter_add')
_BANNED = ('binary_cross_entropy',)
# Cast by CPU autocast only: run with CPU autocast off (grid_sample also promotes, above).
_CPU_ONLY = ('index_copy', 'avg_pool3d', 'max_pool3d', 'adaptive_avg_pool3d', 'grid_sample', 'grid_sampler')
# F.interpolate modes whose kernels are on CUDA's fp32 list ('area' is an adaptive average pool).
_FP32_INTERPOLATE_MODES = ('nearest', 'nearest-exact', 'linear', 'bilinear', 'bicubic', 'trilinear')
_PAD_MODES_CPU_ONLY = ('reflect', 'replicate')

_NAMESPACES = (torch, torch.Tensor, F, torch._C._nn, torch.linalg, torch.special)
# torch's own autocast queries (the context manager swaps the module attributes for GPU-autocast answers).
_is_autocast_enabled = torch.is_autocast_enabled
_get_autocast_dtype = torch.get_autocast_dtype


def _functions(names: tuple[str, ...]) -> frozenset:
    found = set()
    for name in names:
        for namespace in _NAMESPACES:
            function = getattr(namespace, name, None)
            if callable(function):
                found.add(function)
    return frozenset(found)


_FP32_FUNCS = _functions(_FP32)
_FP32_SET_OPT_DTYPE_FUNCS = _functions(_FP32_SET_OPT_DTYPE)
_LOWER_PRECISION_FUNCS = _functions(_LOWER_PRECISION)
_PROMOTE_FUNCS = _functions(_PROMOTE)
_BANNED_FUNCS = _functions(_BANNED)
_CPU_ONLY_FUNCS = _functions(_CPU_ONLY)


def _eligible(x: Any) -> bool:
    """As autocast's ``is_eligible``: a floating-point tensor that is not fp64."""
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


def _cast_all(tree: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda x: x.to(dtype) if _eligible(x) else x, tree)


def _gives_dtype(args: tuple, kwargs: dict) -> bool:
    return kwargs.get('dtype') is not None or any(isinstance(a, torch.dtype) for a in args)


def _has_float32(tree: Any) -> bool:
    found = []
    tree_map(lambda x: found.append(x) if _eligible(x) and x.dtype == torch.float32 else None, tree)
    return bool(found)


class CudaAutocastRules(TorchFunctionMode):
    """Applies CUDA autocast's op lists to the ops called while CPU autocast is enabled (see the module doc)."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not _is_autocast_enabled('cpu'):
            return func(*args, **kwargs)
        low = _get_autocast_dtype('cpu')
        if func in _BANNED_FUNCS:
            raise RuntimeError('binary_cross_entropy is unsafe to autocast and CUDA autocast refuses it; '
                               'use binary_cross_entropy_with_logits (emulated CUDA autocast rule)')
        if func is F.interpolate:
            mode = kwargs.get('mode', args[3] if len(args) > 3 else 'nearest')
            if mode in _FP32_INTERPOLATE_MODES:
                return func(*_cast_all(args, torch.float32), **_cast_all(kwargs, torch.float32))
            return func(*args, **kwargs)
        if func is F.pad:
            mode = kwargs.get('mode', args[2] if len(args) > 2 else 'constant')
            if mode in _PAD_MODES_CPU_ONLY:
                with torch.autocast('cpu', enabled=False):
                    return func(*args, **kwargs)
            return func(*args, **kwargs)
        if func in _FP32_FUNCS:
            args, kwargs = _cast_all(args, torch.float32), _cast_all(kwargs, torch.float32)
        elif func in _FP32_SET_OPT_DTYPE_FUNCS:
            if args and _eligible(args[0]) and not _gives_dtype(args[1:], kwargs):
                args = (args[0].float(),) + tuple(args[1:])
        elif func in _LOWER_PRECISION_FUNCS:
            args, kwargs = _cast_all(args, low), _cast_all(kwargs, low)
        elif func in _PROMOTE_FUNCS:
            widest = torch.float32 if _has_float32((args, kwargs)) else low
            args, kwargs = _cast_all(args, widest), _cast_all(kwargs, widest)
        if func in _CPU_ONLY_FUNCS:
            with torch.autocast('cpu', enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_autocast_rules(dtype: torch.dtype = torch.bfloat16, enter_autocast: bool = True) -> Iterator[None]:
    """Run the block with CUDA autocast's dtype rules on CPU tensors.

    Args:
        dtype: the autocast dtype (``torch.bfloat16``, as ``precision: amp_bf16``; ``torch.float16`` for amp_fp16).
        enter_autocast: enter ``torch.autocast('cpu', dtype)`` around the block (default). With ``False`` the
            rules apply only inside CPU autocast regions the code under test opens itself.

    The mode is thread-local, as autocast is: ops run by other threads (data loader workers) are not affected.
    The GPU-autocast queries are module attributes of ``torch``, answered for every thread while the block runs.
    """
    with contextlib.ExitStack() as stack:
        if enter_autocast:
            stack.enter_context(torch.autocast('cpu', dtype=dtype))
        stack.enter_context(_gpu_autocast_queries_answered_by_cpu())
        stack.enter_context(CudaAutocastRules())
        yield


def _is_gpu_or_given_autocast_enabled(device_type: str | None = None) -> bool:
    return _is_autocast_enabled('cpu' if device_type is None else device_type)


def _get_gpu_autocast_dtype() -> torch.dtype:
    return _get_autocast_dtype('cpu')


@contextlib.contextmanager
def _gpu_autocast_queries_answered_by_cpu() -> Iterator[None]:
    saved = torch.is_autocast_enabled, torch.get_autocast_gpu_dtype
    torch.is_autocast_enabled, torch.get_autocast_gpu_dtype = _is_gpu_or_given_autocast_enabled, _get_gpu_autocast_dtype
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_gpu_dtype = saved
