"""The recipe linter of the dry run: per-GPU memory, effective weight decay, microbatching and streaming cache.

``dry_run=true`` (diffusion/training/dry_run.py) builds the model on the meta device; this module turns that model
and the config into per-GPU figures and warnings:

* **Memory per GPU** (GiB): trainable parameters, gradients and optimizer state as FSDP shards them over
  ``throughput.num_gpus`` (``FULL_SHARD`` / ``SHARD_GRAD_OP`` shard all three; ``SHARD_GRAD_OP`` also keeps the whole
  network in FSDP's compute dtype from forward to backward, ``FULL_SHARD`` two wrapped blocks at a time), the EMA
  copy (sharded like the parameters), the frozen encoders (whole on every GPU, fp32) and the activations of one
  microbatch. Activations are MEASURED: one forward on meta tensors under ``torch.autograd.graph.saved_tensors_hooks``
  sums the bytes autograd keeps for backward (floating tensors counted in the autocast dtype, parameters not
  counted; attention as the fused GPU kernels keep it, see ``_FusedAttention``); with activation checkpointing only the checkpointed blocks' inputs are kept, plus one block's
  activations while it is recomputed. Transient buffers (attention workspaces, the backward's activation
  gradients, allocator fragmentation) are not counted: leave headroom.
* **Effective weight decay per step**: the optimizer block is built on a one-element float64 parameter of value 1
  with a zero gradient and stepped once at the block's (peak) learning rate: ``1 - p`` is the fraction every
  weight loses per step from decay alone (torch AdamW: ``lr * weight_decay``; composer's ``decoupled_adamw``:
  ``weight_decay`` itself, not scaled by the lr). The same step gives the optimizer's state bytes per parameter.
* **Streaming**: bytes of one precomputed row (latents, text states in fp16) times the rows each node reads over
  the run, against the loader's ``cache_limit``.

Warnings: decay per step above ``MAX_DECAY_PER_STEP`` (or above ``throughput.max_decay_per_step`` where a recipe
follows a reference with a stronger decay and says so), an estimate above the GPU's memory, a microbatch that uses
under a third of it while the device batch would allow a larger one, a remote loader without ``cache_limit``, and
frozen encoders that would stay on the CPU (FSDP recipes whose model does not move them).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ['GPU_MEMORY_GIB', 'MAX_DECAY_PER_STEP', 'activation_bytes', 'optimizer_probe', 'lint']

GIB = 2 ** 30
MAX_DECAY_PER_STEP = 1e-5  # the reference SD2-base-256 recipe: torch AdamW lr 1e-4 x wd 0.01 = 1e-6 per step
MIN_MEMORY_FRACTION = 1 / 3
# Memory of one GPU, GiB (80 GB parts report ~79.2-80 GiB to torch; H200 141 GB ~ 140 GiB).
GPU_MEMORY_GIB = {'A100': 80.0, 'A100-40GB': 40.0, 'H100': 79.2, 'H200': 139.8, 'B200': 178.4, 'L40S': 44.4,
                  'A10G': 22.0}
DEFAULT_GPU, DEFAULT_GPUS = 'H100', 8
# Parameters of frozen encoders that load by name (the dry run does not build them): SD2's OpenCLIP ViT-H text
# tower, SDXL's CLIP ViT-L + OpenCLIP ViT-bigG text towers, the SD / SDXL KL-f8 VAE.
FROZEN_PARAMS = {'clip': 340_387_840, 'sdxl_clip_pair': 123_060_480 + 694_659_840, 'autoencoder_kl': 83_653_863}
ROW_OVERHEAD_BYTES = 512  # caption, licence, sizes and the MDS row header, roughly


def optimizer_probe(block: dict[str, Any]) -> tuple[float, float]:
    """(weight lost per step from decay alone at the block's lr, optimizer state bytes per fp32 parameter)."""
    from diffusion import registry
    param = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = registry.build(registry.optimizers, block, 'optimizer', params=[param])
    param.grad = torch.zeros_like(param)
    optimizer.step()
    state = optimizer.state[param]
    # Per-element state (moments) only: scalar step counters are not per parameter. Stored at fp32 in training.
    per_param = sum(4 for v in state.values() if torch.is_tensor(v) and v.numel() == param.numel() and v.dim() > 0)
    return float(1.0 - param.detach().item()), float(per_param)


class _FusedAttention(torch.overrides.TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as a fused kernel on meta tensors.

    On the meta device SDPA takes its math path, whose autograd keeps the (B, heads, L, L) attention matrix; the
    flash and memory-efficient CUDA kernels keep only q, k, v, the output and the log-sum-exp. The CPU flash op
    keeps the same set and has a meta kernel, so it stands in for them here.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].is_meta:
            q, k, v = args[:3]
            extra = dict(zip(('attn_mask', 'dropout_p', 'is_causal', 'scale'), args[3:]), **kwargs)
            extra.pop('enable_gqa', None)
            mask = extra.pop('attn_mask', None)
            if mask is not None and mask.dtype == torch.bool:  # the fused op takes an additive mask
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, extra.get('dropout_p', 0.0), extra.get('is_causal', False), attn_mask=mask,
                scale=extra.get('scale'))[0]
        return func(*args, **kwargs)


def _tensor_bytes(t: torch.Tensor, itemsize: int) -> int:
    return t.numel() * (itemsize if t.is_floating_point() else t.element_size())


def activation_bytes(model: torch.nn.Module, batch: dict[str, Any], itemsize: int,
                     checkpointed: Optional[Callable[[torch.nn.Module], bool]] = None) -> int:
    """Bytes autograd keeps for backward after one forward of ``model`` on ``batch`` (meta tensors).

    Args:
        model: The model (its ``forward(batch)`` and ``loss(outputs, batch)``).
        batch: A batch on the meta device.
        itemsize: Bytes per element of floating tensors (2 under bf16/fp16 autocast, 4 in fp32).
        checkpointed: The activation-checkpointing policy (modules whose activations are recomputed), or None.
    """
    params = {id(p) for p in model.parameters()}
    kept: dict[int, tuple[torch.Tensor, Optional[int]]] = {}  # id -> (tensor, checkpointed block it belongs to)
    stack: list[int] = []
    inputs: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            kept.setdefault(id(t), (t, stack[-1] if stack else None))
        return t

    def enter(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not stack:  # only the outermost checkpointed block keeps its inputs
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            inputs[id(module)] = sum(_tensor_bytes(a, itemsize) for a in tensors)
        stack.append(id(module))

    def leave(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        stack.pop()

    handles = []
    if checkpointed is not None:
        for module in model.modules():
            if checkpointed(module):
                handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
                handles.append(module.register_forward_hook(leave, with_kwargs=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FusedAttention():
            outputs = model(batch)
            model.loss(outputs, batch)
    finally:
        for handle in handles:
            handle.remove()
    outside = sum(_tensor_bytes(t, itemsize) for t, owner in kept.values() if owner is None)
    per_block: dict[int, int] = {}
    for t, owner in kept.values():
        if owner is not None:
            per_block[owner] = per_block.get(owner, 0) + _tensor_bytes(t, itemsize)
    if checkpointed is None:
        return outside
    return outside + sum(inputs.values()) + max(per_block.values(), default=0)


def _checkpoint_policy(cfg: Any, model: torch.nn.Module) -> Optional[Callable[[torch.nn.Module], bool]]:
    fsdp_ac = bool((cfg.fsdp_config or {}).get('activation_checkpointing'))
    if not (fsdp_ac or 'activation_checkpointing' in (cfg.algorithms or {})):
        return None
    backbone = getattr(model, 'backbone', model)
    return getattr(backbone, 'activation_checkpointing_fn', None)


def _largest_wrapped_unit(model: torch.nn.Module) -> int:
    backbone = getattr(model, 'backbone', model)
    policy = getattr(backbone, 'fsdp_wrap_fn', None)
    if policy is None:
        return sum(p.numel() for p in backbone.parameters())
    return max((sum(p.numel() for p in m.parameters()) for m in backbone.modules() if policy(m)), default=0)


def _frozen_params(cfg: Any, model: torch.nn.Module, info: dict[str, Any]) -> int:
    """Parameters of the frozen encoders: built ones counted, ones loading by name from FROZEN_PARAMS."""
    count = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    te, ae = cfg.model.get('text_encoder') or {}, cfg.model.get('autoencoder') or {}
    if any(n.startswith('text_encoder') for n in info.get('not_built', [])):
        count += FROZEN_PARAMS.get(te.get('name'), 0)
    if any(n.startswith('autoencoder') for n in info.get('not_built', [])):
        count += FROZEN_PARAMS['autoencoder_kl']
    return count


def _cache_bytes(limit: Any) -> Optional[int]:
    if limit is None:
        return None
    if isinstance(limit, (int, float)):
        return int(limit)
    from streaming.base.util import bytes_to_int
    return int(bytes_to_int(limit))


def _row_bytes(batch: dict[str, Any]) -> int:
    """Stored bytes of one precomputed row: latents and text states as fp16, the mask as uint8."""
    total = ROW_OVERHEAD_BYTES
    for key in ('latents', 'text_hidden', 'text_pooled'):
        if key in batch:
            total += batch[key][0].numel() * 2
    if 'text_mask' in batch:
        total += batch['text_mask'][0].numel()
    return total


def _encoders_stay_on_cpu(cfg: Any, model: torch.nn.Module) -> bool:
    """Whether an FSDP run would leave the frozen encoders on the CPU.

    Composer moves the model to the GPU only when no parallelism config is given, and its FSDP skips children
    marked ``_fsdp_wrap = False`` (the frozen encoders), so under FSDP they stay where they were built unless the
    project moves them: ``diffusion.training.train.place_unsharded_parts`` does, after composer's FSDP wrapping.
    """
    if cfg.fsdp_config is None or not (cfg.model.get('text_encoder') or cfg.model.get('autoencoder')):
        return False
    from diffusion.training import train
    return not callable(getattr(train, 'place_unsharded_parts', None))


def lint(cfg: Any, model: torch.nn.Module, info: dict[str, Any], meta_batch: Callable[[int], dict[str, Any]],
         trainable: int) -> tuple[dict[str, Any], list[str]]:
    """Per-GPU figures and warnings for a config whose model was built on the meta device (module docstring)."""
    throughput = cfg.throughput or {}
    gpu = throughput.get('gpu') or DEFAULT_GPU
    gpus = int(throughput.get('num_gpus') or DEFAULT_GPUS)
    memory = GPU_MEMORY_GIB.get(gpu)
    fsdp = cfg.fsdp_config
    strategy = None if fsdp is None else str(fsdp.get('sharding_strategy', 'FULL_SHARD')).upper()
    shard = gpus if strategy in ('FULL_SHARD', 'SHARD_GRAD_OP', 'HYBRID_SHARD', '_HYBRID_SHARD_ZERO2') else 1
    if strategy in ('HYBRID_SHARD', '_HYBRID_SHARD_ZERO2'):
        shard = min(gpus, 8)  # one node
    low_precision = cfg.precision in ('amp_bf16', 'amp_fp16')
    itemsize = 2 if low_precision else 4
    mixed = str((fsdp or {}).get('mixed_precision', 'DEFAULT')).upper()
    compute_itemsize = 2 if low_precision and mixed in ('DEFAULT', 'PURE') else 4

    decay, state_bytes = optimizer_probe(cfg.optimizer)
    device_batch = cfg.global_train_batch_size // gpus
    micro = cfg.device_train_microbatch_size
    micro = device_batch if not isinstance(micro, int) else min(micro, device_batch)
    probe_n = 2
    act = activation_bytes(model, meta_batch(probe_n), itemsize, _checkpoint_policy(cfg, model)) * micro / probe_n

    params = 4 * trainable / shard
    if strategy in ('SHARD_GRAD_OP', '_HYBRID_SHARD_ZERO2'):
        params += compute_itemsize * trainable  # the whole network unsharded from forward to backward
    elif strategy in ('FULL_SHARD', 'HYBRID_SHARD'):
        params += 2 * compute_itemsize * _largest_wrapped_unit(model)  # the running block + the prefetched one
    ema = 4 * trainable / shard if 'ema' in (cfg.algorithms or {}) else 0.0
    frozen = 4 * _frozen_params(cfg, model, info)
    rows = {
        'gpu': gpu, 'gpu_memory_gib': memory, 'num_gpus': gpus, 'fsdp_sharding': strategy or 'none (DDP)',
        'shard_factor': shard, 'device_batch_size': device_batch, 'microbatch_size': micro,
        'microbatches_per_step': -(-device_batch // micro),
        'mem_params_gib': params / GIB, 'mem_grads_gib': 4 * trainable / shard / GIB,
        'mem_optimizer_gib': state_bytes * trainable / shard / GIB, 'mem_ema_gib': ema / GIB,
        'mem_frozen_encoders_gib': frozen / GIB, 'mem_activations_gib': act / GIB,
    }
    total = sum(v for k, v in rows.items() if k.startswith('mem_'))
    rows['mem_total_gib'] = total
    rows['memory_fraction'] = None if memory is None else total / memory
    rows['decay_per_step'] = decay
    rows['optimizer_state_bytes_per_param'] = state_bytes

    warnings: list[str] = []
    limit = float(throughput.get('max_decay_per_step') or MAX_DECAY_PER_STEP)
    if decay > limit * (1 + 1e-6):
        warnings.append(f'weight decay removes {decay:.3g} of every weight per step (above {limit:.0e}): composer\'s '
                        'decoupled_adamw does not scale weight_decay by the lr; torch adamw decays lr * weight_decay')
    if memory is not None and total > memory:
        warnings.append(f'estimated {total:.1f} GiB per GPU exceeds the {gpu}\'s {memory:.0f} GiB: lower '
                        'device_train_microbatch_size or shard more')
    elif memory is not None and total < MIN_MEMORY_FRACTION * memory and micro < device_batch:
        warnings.append(f'microbatch {micro} uses {total:.1f} of {memory:.0f} GiB (under a third) while the device '
                        f'batch is {device_batch}: a larger device_train_microbatch_size runs fewer, fuller steps')
    loader = cfg.train_loader
    if loader.get('remote') or any(s.get('remote') for s in (loader.get('streams') or [])
                                   if isinstance(s, dict)):
        batch = meta_batch(1)
        nodes = max(1, gpus // 8)
        rows['stream_row_bytes'] = _row_bytes(batch) if 'latents' in batch else None  # pixels: JPEG sizes vary
        from diffusion.training.dry_run import images_to_train
        images = images_to_train(cfg)
        rows['stream_gib_per_node_over_run'] = None if images is None or rows['stream_row_bytes'] is None \
            else images / nodes * rows['stream_row_bytes'] / GIB
        cache = _cache_bytes(loader.get('cache_limit'))
        rows['cache_limit_gib'] = None if cache is None else cache / GIB
        if cache is None:
            warnings.append('train_loader has a remote but no cache_limit: streaming keeps every shard it downloads '
                            f"(~{_fmt_gib(rows['stream_gib_per_node_over_run'])} per node over the run)")
        if not loader.get('num_canonical_nodes'):
            warnings.append('train_loader has no fixed num_canonical_nodes: a resume on another node count reshuffles')
    if _encoders_stay_on_cpu(cfg, model):
        warnings.append('frozen encoders are not FSDP-wrapped and nothing moves them to the GPU: they run on the CPU')
    return rows, warnings


def _fmt_gib(value: Optional[float]) -> str:
    return '?' if value is None else f'{value:,.0f} GiB'
