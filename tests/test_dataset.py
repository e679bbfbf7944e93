"""StreamingImageCaptionDataset: pixel batches, crops, dropout, latents, streams, determinism, resume."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion import registry
from diffusion.data.dataset import StreamingImageCaptionDataset, aspect_buckets, build_image_caption_dataloader
from diffusion.data.writer import DEFAULT_COLUMNS, DatasetWriter

PIXEL_KEYS = {'image', 'caption', 'caption_dropped', 'original_size', 'crop_top_left', 'target_size', 'flip'}


def _batches(spec, n: int) -> list[dict]:
    out = []
    for batch in spec.dataloader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _free(*objs) -> None:
    """Drop datasets so streaming releases their shared memory before the next one opens."""
    del objs
    gc.collect()


def test_pixel_batches_from_registry(demo_photos):
    spec = registry.build(registry.dataloaders, {
        'name': 'image_caption', 'batch_size': 4, 'local': str(demo_photos), 'split': 'train',
        'resolution': 32, 'crop': 'random', 'random_flip': True, 'caption_dropout': 0.0, 'shuffle': False})
    batch = _batches(spec, 1)[0]
    assert set(batch) == PIXEL_KEYS
    assert batch['image'].shape == (4, 3, 32, 32) and batch['image'].dtype == torch.float32
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0 and batch['image'].std() > 0.1
    assert all(isinstance(c, str) and c for c in batch['caption']) and not batch['caption_dropped'].any()
    assert batch['original_size'].shape == (4, 2) and batch['original_size'][0].tolist() == [512, 512]
    assert (batch['target_size'] == 32).all() and batch['flip'].shape == (4,)
    assert spec.get_num_samples_in_batch(batch) == 4
    _free(spec)


def test_deterministic_and_dropout(demo_photos):
    kwargs = dict(local=str(demo_photos), split='train', resolution=32, crop='random', random_flip=True,
                  caption_dropout=0.5, shuffle=True, shuffle_seed=3)
    first = _batches(build_image_caption_dataloader(4, **kwargs), 3)
    gc.collect()
    second = _batches(build_image_caption_dataloader(4, **kwargs), 3)
    for a, b in zip(first, second):
        assert torch.equal(a['image'], b['image']) and a['caption'] == b['caption']
        assert torch.equal(a['crop_top_left'], b['crop_top_left']) and torch.equal(a['flip'], b['flip'])
    dropped = torch.cat([b['caption_dropped'] for b in first])
    captions = [c for b in first for c in b['caption']]
    assert 0 < int(dropped.sum()) < len(dropped)  # 12 draws at p=0.5
    assert all((c == '') == bool(d) for c, d in zip(captions, dropped))
    flips = torch.cat([b['flip'] for b in first])
    assert 0 < int(flips.sum()) < len(flips)
    gc.collect()
    always = _batches(build_image_caption_dataloader(4, **{**kwargs, 'caption_dropout': 1.0}), 1)[0]
    assert always['caption'] == [''] * 4 and always['caption_dropped'].all()
    gc.collect()


def test_center_crop_and_aspect_buckets(demo_photos):
    spec = build_image_caption_dataloader(8, local=str(demo_photos), split='train', resolution=64, crop='center',
                                          shuffle=False)
    batch = _batches(spec, 1)[0]
    # the first train photo (astronaut) is square: a centre crop has no offset
    assert batch['crop_top_left'][0].tolist() == [0, 0]
    _free(spec)
    spec = build_image_caption_dataloader(8, local=str(demo_photos), split='train', resolution=64,
                                          crop='aspect_buckets', shuffle=False)
    for batch in _batches(spec, 2):
        height, width = batch['image'].shape[-2:]
        assert (height, width) in aspect_buckets(64)
        assert (batch['target_size'] == torch.tensor([height, width])).all()
    _free(spec)


def test_streams_mixing(demo_photos):
    streams = [{'local': str(demo_photos), 'split': 'train', 'proportion': 0.75},
               {'local': str(demo_photos), 'split': 'eval', 'proportion': 0.25}]
    spec = build_image_caption_dataloader(4, streams=streams, resolution=32, shuffle=True, drop_last=False)
    dataset = spec.dataloader.dataset
    assert dataset.num_samples == 24
    eval_captions = {json.dumps(c) for c in _eval_captions(demo_photos)}
    seen = [c for b in spec.dataloader for c in b['caption']]
    assert len(seen) == 24 and sum(json.dumps(c) in eval_captions for c in seen) == 6
    _free(spec, dataset)


def _eval_captions(root: Path) -> list[str]:
    from diffusion.demo.photos import demo_photo_entries
    return [e['caption'] for e in demo_photo_entries() if e['split'] == 'eval']


def test_mid_epoch_resume_is_sample_exact(demo_photos):
    kwargs = dict(local=str(demo_photos), split='train', resolution=32, crop='random', random_flip=True,
                  caption_dropout=0.2, shuffle=True, shuffle_seed=7)
    spec = build_image_caption_dataloader(2, **kwargs)
    full = [b for b in spec.dataloader]
    state = spec.dataloader.dataset.state_dict(num_samples=6, from_beginning=False)  # as Composer saves it
    _free(spec)
    resumed_spec = build_image_caption_dataloader(2, **kwargs)
    resumed_spec.dataloader.dataset.load_state_dict(state)
    rest = [b for b in resumed_spec.dataloader]
    assert len(rest) == len(full) - 3
    for a, b in zip(full[3:], rest):
        assert a['caption'] == b['caption'] and torch.equal(a['image'], b['image'])
    _free(resumed_spec)


def test_a_dataset_waits_for_another_process_claiming_a_shared_memory_prefix(demo_photos, monkeypatch):
    """Building a dataset takes the machine-wide prefix lock (two processes claiming a streaming prefix at once
    collide): while another process holds it, the build waits; a non-leader rank (LOCAL_RANK 1) does not."""
    import subprocess
    import sys
    import time

    from diffusion.data.dataset import PREFIX_LOCK
    holder = subprocess.Popen([sys.executable, '-c', (
        'import fcntl, sys, time\n'
        f'h = open({str(PREFIX_LOCK)!r}, "a"); fcntl.flock(h, fcntl.LOCK_EX); print("held", flush=True)\n'
        'time.sleep(2.0)')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        start = time.perf_counter()
        ds = StreamingImageCaptionDataset(local=str(demo_photos), split='train', resolution=32, batch_size=1)
        waited = time.perf_counter() - start
    finally:
        holder.wait()
    assert waited > 1.0, waited
    _free(ds)
    holder = subprocess.Popen([sys.executable, '-c', (
        'import fcntl, time\n'
        f'h = open({str(PREFIX_LOCK)!r}, "a"); fcntl.flock(h, fcntl.LOCK_EX); print("held", flush=True)\n'
        'time.sleep(3.0)')], stdout=subprocess.PIPE, text=True)
    monkeypatch.setenv('LOCAL_RANK', '1')
    try:
        assert holder.stdout.readline().strip() == 'held'
        start = time.perf_counter()
        ds = StreamingImageCaptionDataset(local=str(demo_photos), split='train', resolution=32, batch_size=1)
        assert time.perf_counter() - start < 1.5
    finally:
        holder.wait()
    _free(ds)


@pytest.fixture(scope='module')
def latent_set(tmp_path_factory) -> Path:
    """A dataset with the columns convert/precompute_latents.py adds (random values of the right shapes)."""
    out = tmp_path_factory.mktemp('latents')
    columns = {**DEFAULT_COLUMNS, 'latents_32': 'ndarray:float16', 'text_hidden': 'ndarray:float16',
               'text_mask': 'ndarray:uint8', 'text_pooled': 'ndarray:float16'}
    columns.pop('image')
    rng = np.random.default_rng(0)
    with DatasetWriter(out, columns, eval_fraction=0.0) as writer:
        for i in range(8):
            writer.write({
                'caption': f'latent sample {i}', 'caption_source': 'test', 'caption_weak': 0, 'license': 'CC0-1.0',
                'license_url': '', 'creator': 'test', 'source': 'test', 'source_path': str(i), 'width': 64,
                'height': 48, 'sha256': str(i), 'key': f'k{i}',
                'latents_32': rng.standard_normal((4, 4, 4)).astype(np.float16),
                'text_hidden': rng.standard_normal((6, 8)).astype(np.float16),
                'text_mask': (np.arange(6) < 3).astype(np.uint8),
                'text_pooled': rng.standard_normal(8).astype(np.float16)})
    return out


def test_latent_mode(latent_set):
    spec = build_image_caption_dataloader(4, local=str(latent_set), split='train', resolution=32, use_latents=True,
                                          caption_dropout=1.0, shuffle=False)
    batch = _batches(spec, 1)[0]
    assert 'image' not in batch
    assert batch['latents'].shape == (4, 4, 4, 4) and batch['text_hidden'].shape == (4, 6, 8)
    assert batch['text_pooled'].shape == (4, 8)
    assert batch['text_mask'][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch['caption_dropped'].all() and batch['original_size'][0].tolist() == [48, 64]
    # The precomputed centre crop: 48x64 covered at side 32 -> 32x43, crop offset (0, round(11 / 2)) = (0, 6)
    # (Python rounds 5.5 half to even), target 32x32.
    assert batch['target_size'][0].tolist() == [32, 32] and batch['crop_top_left'][0].tolist() == [0, 6]
    _free(spec)
    with pytest.raises(ValueError, match='random_flip'):
        StreamingImageCaptionDataset(local=str(latent_set), split='train', use_latents=True, random_flip=True)
    spec = build_image_caption_dataloader(4, local=str(latent_set), split='train', resolution=32,
                                          use_latents=64, shuffle=False)
    with pytest.raises(KeyError, match='latents_64'):
        _batches(spec, 1)
    _free(spec)


def test_latents_keep_their_stored_dtype_to_the_device(latent_set):
    """fp16 latents and text states cross to the device as stored (half the bytes of fp32); the model casts them
    there and gives the same loss as on fp32 batches; ``upcast: true`` gives fp32 from the workers."""
    from diffusion.models.latent_diffusion import LatentDiffusion
    kwargs = dict(local=str(latent_set), split='train', resolution=32, use_latents=True, shuffle=False)
    spec = build_image_caption_dataloader(4, **kwargs)
    stored = _batches(spec, 1)[0]
    _free(spec)
    spec = build_image_caption_dataloader(4, upcast=True, **kwargs)
    upcast = _batches(spec, 1)[0]
    _free(spec)
    for key in ('latents', 'text_hidden', 'text_pooled'):
        assert stored[key].dtype == torch.float16 and upcast[key].dtype == torch.float32, key
        assert torch.equal(stored[key].float(), upcast[key])
    assert stored['text_mask'].dtype == upcast['text_mask'].dtype == torch.float32
    model = registry.build(registry.models, {
        'name': 'latent_diffusion', 'scaling_factor': 0.5, 'noise_schedule': {'name': 'ddpm'}, 'use_time_ids': False,
        'backbone': {'name': 'unet', 'preset': 'mini-s', 'sample_size': 4, 'in_channels': 4, 'out_channels': 4,
                     'cross_attention_dim': 8}}, 'model')
    assert isinstance(model, LatentDiffusion)
    model.eval()
    losses = []
    for batch in (stored, upcast):
        torch.manual_seed(0)
        losses.append(model.loss(model(batch), batch))
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])


def test_streaming_scale_arguments_reach_streaming(latent_set):
    """cache_limit and num_canonical_nodes (the full recipes' loaders) are passed to StreamingDataset."""
    spec = build_image_caption_dataloader(2, local=str(latent_set), split='train', resolution=32, use_latents=True,
                                          cache_limit='2tb', num_canonical_nodes=16, pin_memory=True)
    dataset = spec.dataloader.dataset
    assert dataset.cache_limit == 2 * 1024 ** 4 and dataset.num_canonical_nodes == 16
    assert spec.dataloader.pin_memory
    _free(spec)
