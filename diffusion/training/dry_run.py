"""Dry run: check and build a training config on the meta device and estimate what the run costs.

``composer run.py yamls/X.yaml dry_run=true`` builds the model, optimizer, scheduler, algorithms, callbacks and
loggers with every tensor on PyTorch's ``meta`` device (no memory, no weights loaded, no data read), checks the
loader blocks, then counts the FLOPs of one training step per image with ``torch.utils.flop_counter`` (forward,
loss and backward of the trainable network on a meta batch shaped like the real one). From a declared
throughput (``throughput:`` in the YAML or on the command line) it turns images into GPU-hours and money:

.. code-block:: yaml

    throughput:                      # CommonCanvas (Gokaslan et al. 2024), Table: 11,600 img/s on 128 A100
      gpu: A100
      images_per_second_per_gpu: 90.625
      num_gpus: 128
      usd_per_gpu_hour: 2.0          # optional

Frozen encoders that load pretrained weights by name are not built (nothing can be loaded in a dry run); the
widths they would give are the known ones below, and FLOPs are those of the trainable network on precomputed
latents (as the CommonCanvas recipes train). The recipe linter (diffusion/training/recipe_lint.py) adds per-GPU
memory, the effective weight decay per step, microbatches per step and the streaming cache against ``cache_limit``
for ``throughput.gpu`` x ``throughput.num_gpus`` (default: 8 H100), and prints a ``WARNING:`` line under the table
for each thing a recipe gets wrong. The last printed line is a JSON object of the figures (``warnings`` included).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from diffusion.config import ConfigError, TrainConfig
from diffusion.training.recipe_lint import lint

log = logging.getLogger(__name__)

__all__ = ['estimate', 'format_table', 'images_to_train', 'run_dry']

# Output widths (per-token, pooled) of frozen text encoders that load weights by name: SD2's OpenCLIP ViT-H
# (1024; pooled only with `pooled: projection`), SDXL's CLIP-L + OpenCLIP bigG pair (768 + 1280, pooled 1280),
# all-MiniLM-L6-v2 (384, mean-pooled 384).
TEXT_WIDTHS = {'clip': (1024, 0), 'sdxl_clip_pair': (2048, 1280), 'minilm': (384, 384)}
# SD / SDXL VAE: 4 latent channels, 8x downsampling (used when the autoencoder is loaded by name).
PRETRAINED_VAE = (4, 8)
THROUGHPUT_KEYS = {'gpu': str, 'images_per_second_per_gpu': (int, float), 'num_gpus': int,
                   'usd_per_gpu_hour': (int, float), 'max_decay_per_step': (int, float)}


def _check_throughput(block: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if block is None:
        return None
    unknown = sorted(set(block) - set(THROUGHPUT_KEYS))
    if unknown:
        raise ConfigError(f'throughput: unknown key(s) {unknown}; accepted: {sorted(THROUGHPUT_KEYS)}')
    for key, tp in THROUGHPUT_KEYS.items():
        value = block.get(key)
        if value is not None and (not isinstance(value, tp) or isinstance(value, bool)):
            raise ConfigError(f'throughput.{key} must be {getattr(tp, "__name__", "a number")}, got {value!r}')
    if block.get('usd_per_gpu_hour') is not None and not block.get('images_per_second_per_gpu'):
        raise ConfigError('throughput.usd_per_gpu_hour needs throughput.images_per_second_per_gpu (measured or '
                          'published images/s per GPU)')
    return block


def _dataset_size(loader: dict[str, Any]) -> Optional[int]:
    """Samples in a local MDS split (from its index.json), or None when it is remote or absent."""
    local, split = loader.get('local'), loader.get('split')
    if not local or loader.get('remote') or loader.get('streams'):
        return None
    index = Path(local) / (split or '') / 'index.json'
    if not index.exists():
        return None
    return sum(int(s.get('samples', 0)) for s in json.loads(index.read_text()).get('shards', []))


def images_to_train(cfg: TrainConfig) -> Optional[int]:
    """Images the run trains on: batches x global batch, samples, or epochs x local dataset size (else None)."""
    from composer.core import Time, TimeUnit
    duration = Time.from_timestring(cfg.max_duration)
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value) * cfg.global_train_batch_size
    if duration.unit == TimeUnit.SAMPLE:
        return int(duration.value)
    if duration.unit == TimeUnit.EPOCH:
        size = _dataset_size(cfg.train_loader)
        per_epoch = None if size is None else size // cfg.global_train_batch_size * cfg.global_train_batch_size
        return None if per_epoch is None else int(duration.value) * per_epoch
    return None


def _frozen_parts(model_block: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model block for the meta build (encoders loading weights by name removed) and the widths it needs."""
    from diffusion import registry
    block = dict(model_block)
    info: dict[str, Any] = {'latent_channels': None, 'downsample': None, 'text_dim': None, 'pooled_dim': 0,
                            'not_built': []}
    te = block.get('text_encoder')
    if te:
        if te['name'] in TEXT_WIDTHS:
            info['text_dim'], info['pooled_dim'] = TEXT_WIDTHS[te['name']]
            if te['name'] == 'clip' and te.get('pooled') in ('projection', 'pooler'):
                info['pooled_dim'] = 1024
            info['not_built'].append(f"text_encoder ({te['name']})")
            block.pop('text_encoder')
        else:
            built = registry.build(registry.text_encoders, te, 'model.text_encoder')
            info['text_dim'], info['pooled_dim'] = built.hidden_dim, built.pooled_dim
    ae = block.get('autoencoder')
    if ae and ae.get('pretrained'):
        info['latent_channels'], info['downsample'] = PRETRAINED_VAE
        info['not_built'].append('autoencoder (pretrained)')
        block.pop('autoencoder')
        block.setdefault('scaling_factor', 1.0)
    elif ae:
        built = registry.build(registry.autoencoders, ae, 'model.autoencoder')
        info['latent_channels'], info['downsample'] = built.latent_channels, built.downsample_factor
    backbone = dict(block['backbone'])
    if info['text_dim']:
        backbone.setdefault('cross_attention_dim', info['text_dim'])
        if info['pooled_dim']:
            backbone.setdefault('pooled_text_dim', info['pooled_dim'])
    if info['latent_channels']:
        backbone.setdefault('in_channels', info['latent_channels'])
        backbone.setdefault('out_channels', info['latent_channels'])
    block['backbone'] = backbone
    return block, info


def _meta_batch(cfg: TrainConfig, model: Any, info: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
    """A training batch of ``n`` images on the meta device, shaped as the loader would give it."""
    res = int(cfg.train_loader.get('resolution', 256))
    meta = torch.device('meta')
    if not hasattr(model, 'batch_latents'):  # e.g. autoencoder training: pixels
        return {'image': torch.empty(n, 3, res, res, device=meta)}
    side = res // (info['downsample'] or 8)
    batch = {'latents': torch.empty(n, info['latent_channels'] or 4, side, side, device=meta),
             'text_hidden': torch.empty(n, 77, info['text_dim'] or 768, device=meta),
             'text_mask': torch.ones(n, 77, dtype=torch.long, device=meta)}
    if info['pooled_dim']:
        batch['text_pooled'] = torch.empty(n, info['pooled_dim'], device=meta)
    sizes = torch.full((n, 2), res, dtype=torch.long, device=meta)
    batch.update(original_size=sizes, crop_top_left=torch.zeros_like(sizes), target_size=sizes)
    return batch


def _replace_buffers(model: torch.nn.Module, which: Callable[[torch.Tensor], bool],
                     new: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace each buffer ``which`` selects by ``new(buffer)``, under its own name (persistence is kept)."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False, remove_duplicate=False)):
            if which(buf):
                setattr(module, name, new(buf))


def _step_flops(cfg: TrainConfig, model: Any, info: dict[str, Any], n: int = 2) -> int:
    """FLOPs of one training step (forward, loss, backward) per image, counted on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode
    batch = _meta_batch(cfg, model, info, n)
    model.train()
    # Integer buffers (step counters) steer Python control flow, which needs values: give them real zeros.
    _replace_buffers(model, lambda buf: buf.is_meta and not buf.is_floating_point(),
                     lambda buf: torch.zeros(buf.shape, dtype=buf.dtype))
    counter = FlopCounterMode(display=False)
    with counter:
        outputs = model(batch)
        loss = model.loss(outputs, batch)
        if isinstance(loss, dict):
            loss = loss['total']
        loss.backward()
    return counter.get_total_flops() // n


def estimate(cfg: TrainConfig) -> dict[str, Any]:
    """Build everything on the meta device and return the dry-run figures (see the module docstring)."""
    from diffusion import registry
    from diffusion.builders import build_mapping, check_components, import_components
    import_components()
    check_components(cfg)
    throughput = _check_throughput(cfg.throughput)
    model_block = cfg.model
    info: dict[str, Any] = {'latent_channels': None, 'downsample': None, 'text_dim': None, 'pooled_dim': 0,
                            'not_built': []}
    with torch.device('meta'):
        if cfg.model.get('name') == 'latent_diffusion':
            model_block, info = _frozen_parts(cfg.model)
        model = registry.build(registry.models, model_block, 'model')
        params = [p for p in model.parameters() if p.requires_grad]
        registry.build(registry.optimizers, cfg.optimizer, 'optimizer', params=params)
        if cfg.scheduler:
            registry.build(registry.schedulers, cfg.scheduler, 'scheduler')
        for where in ('algorithms', 'callbacks', 'loggers'):
            build_mapping(getattr(registry, where), getattr(cfg, where), where)
    # Buffers made from numpy (torch.from_numpy ignores the default device, e.g. MicroDiT's sin-cos position table)
    # are real CPU tensors: to the meta device with the rest, or a meta forward mixes devices.
    _replace_buffers(model, lambda buf: not buf.is_meta and buf.is_floating_point(), lambda buf: buf.to('meta'))
    # MicroDiT's expert skip sizes its work from data (a host read no meta tensor has); the GPU path runs without
    # it (it is off under torch.compile), so the figures here are that path's.
    if hasattr(getattr(model, 'backbone', None), 'skip_dropped_experts'):
        model.backbone.skip_dropped_experts = False
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in params)
    flops = _step_flops(cfg, model, info)
    per_gpu, warnings = lint(cfg, model, info, lambda n: _meta_batch(cfg, model, info, n), trainable)
    images = images_to_train(cfg)
    out: dict[str, Any] = {
        'run_name': cfg.run_name, 'parameters_total': total, 'parameters_trainable': trainable,
        'not_built': info['not_built'], 'train_flops_per_image': flops,
        'resolution': cfg.train_loader.get('resolution'), 'global_batch_size': cfg.global_train_batch_size,
        'max_duration': cfg.max_duration, 'images': images,
        'train_flops_total': None if images is None else flops * images,
    }
    out.update(per_gpu)
    if throughput and throughput.get('images_per_second_per_gpu'):
        ips = float(throughput['images_per_second_per_gpu'])
        gpus = throughput.get('num_gpus')
        gpu_hours = None if images is None else images / ips / 3600
        out.update(gpu=throughput.get('gpu'), images_per_second_per_gpu=ips, num_gpus=gpus, gpu_hours=gpu_hours,
                   wall_clock_hours=None if gpu_hours is None or not gpus else gpu_hours / gpus,
                   achieved_tflops_per_gpu=flops * ips / 1e12,
                   usd_per_gpu_hour=throughput.get('usd_per_gpu_hour'),
                   cost_usd=None if gpu_hours is None or throughput.get('usd_per_gpu_hour') is None
                   else gpu_hours * float(throughput['usd_per_gpu_hour']))
    out['warnings'] = warnings
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f'{value:,.1f}' if abs(value) >= 10 or value == 0 else f'{value:.4g}'
    if isinstance(value, int) and not isinstance(value, bool):
        exp = int(math.log10(abs(value))) if value else 0
        return f'{value:,}' if exp < 13 else f'{value:.3e}'
    return '-' if value is None else str(value)


def format_table(figures: dict[str, Any]) -> str:
    """The figures as a two-column text table."""
    width = max(len(k) for k in figures)
    rows = [f"{'figure'.ljust(width)} | value", f"{'-' * width}-|------"]
    rows += [f'{k.ljust(width)} | {_fmt(v)}' for k, v in figures.items()]
    return '\n'.join(rows)


def run_dry(cfg: TrainConfig) -> dict[str, Any]:
    """The ``dry_run=true`` command: print the table and, last, one JSON line of the figures."""
    figures = estimate(cfg)
    print(format_table({k: v for k, v in figures.items() if k != 'warnings'}), flush=True)
    for warning in figures['warnings']:
        print(f'WARNING: {warning}', flush=True)
    print(json.dumps(figures), flush=True)
    return figures
