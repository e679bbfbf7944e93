"""Data pipeline throughput, each figure beside a plain PIL-in-a-Python-loop baseline in the same run.

1. Conversion (images/s): ``convert/commoncatalog_mini.py`` with 1 and 2 workers (sanitise, render SVG,
   resize, JPEG-encode, write MDS) versus a plain loop that opens, renders, resizes and JPEG-encodes
   the same files without writing a dataset.
2. Dataloader (samples/s): the ``image_caption`` loader (random crop, flip, batch 16) with 0 and 2
   workers versus a plain loop that decodes the same stored JPEGs, crops and builds tensors.
The tiny model's step rate to compare the loader with defaults to 15 img/s (an 18M-parameter diffusers UNet,
batch 16, fp32, on a 2-core CPU; a figure given, not measured in this run): measure yours with
``bench/step.py`` and pass it as ``--step-rate``.

Usage: python bench/data.py [--per-source 40] [--repeats 3] [--cache-dir data/cache]
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusion.data.sanitize import render_svg  # noqa: E402


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / 'convert' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def baseline_convert(paths: list[str], size: int) -> float:
    """Plain loop: open (render SVG), RGB, thumbnail, JPEG-encode. Returns images/s."""
    start = time.perf_counter()
    for path in paths:
        data = Path(path).read_bytes()
        if path.endswith('.svg'):
            data = render_svg(data, size)
        image = Image.open(io.BytesIO(data)).convert('RGB')
        image.thumbnail((size, size))
        image.save(io.BytesIO(), format='JPEG', quality=90)
    return len(paths) / (time.perf_counter() - start)


def ours_convert(cc, argv: list[str], n: int) -> float:
    start = time.perf_counter()
    cc.main(argv)
    return n / (time.perf_counter() - start)


def baseline_loader(jpegs: list[bytes], resolution: int, batch: int) -> float:
    """Plain loop: decode, resize, random crop, flip, to tensor, stack. Returns samples/s."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    tensors = []
    for data in jpegs:
        image = Image.open(io.BytesIO(data)).convert('RGB')
        scale = resolution / min(image.size)
        image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))))
        left, top = rng.integers(0, image.width - resolution + 1), rng.integers(0, image.height - resolution + 1)
        array = np.array(image.crop((left, top, left + resolution, top + resolution)))
        if rng.random() < 0.5:
            array = array[:, ::-1]
        tensors.append(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 127.5 - 1)
        if len(tensors) == batch:
            torch.stack(tensors)
            tensors = []
    return len(jpegs) / (time.perf_counter() - start)


def ours_loader(out: Path, resolution: int, batch: int, workers: int) -> float:
    from diffusion.data.dataset import build_image_caption_dataloader

    spec = build_image_caption_dataloader(batch, local=str(out), split='train', resolution=resolution, crop='random',
                                          random_flip=True, caption_dropout=0.1, num_workers=workers, drop_last=False)
    start = time.perf_counter()
    count = sum(len(b['caption']) for b in spec.dataloader)
    rate = count / (time.perf_counter() - start)
    del spec
    return rate


def read_jpegs(out: Path) -> list[bytes]:
    """The stored JPEG bytes of every row of ``out/train`` (read with streaming's shard reader)."""
    from streaming.base.format import reader_from_json

    jpegs = []
    for info in json.loads((out / 'train' / 'index.json').read_text())['shards']:
        shard = reader_from_json(str(out / 'train'), None, info)
        for i in range(shard.samples):
            buffer = io.BytesIO()
            shard[i]['image'].save(buffer, format='JPEG', quality=90)  # same content as stored
            jpegs.append(buffer.getvalue())
    return jpegs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--per-source', type=int, default=40)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--resolution', type=int, default=64)
    parser.add_argument('--cache-dir', default=str(REPO / 'data' / 'cache'))
    parser.add_argument('--step-rate', type=float, default=15.0, help='tiny model train img/s to compare with')
    args = parser.parse_args()
    cc = _load_script('commoncatalog_mini')
    tmp = Path(tempfile.mkdtemp(prefix='bench_data_'))
    base = ['--cache-dir', args.cache_dir, '--max-per-source', str(args.per_source), '--size', str(args.size),
            '--eval-fraction', '0', '--overwrite']
    items = cc.list_items(cc.parse_args(['--out', str(tmp / 'x'), *base]))
    paths = [item.path for item in items]
    n = len(paths)

    figures: dict[str, list[float]] = {k: [] for k in ('base_conv', 'conv1', 'conv2', 'base_load', 'load0', 'load2')}
    for _ in range(args.repeats):
        figures['base_conv'].append(baseline_convert(paths, args.size))
        figures['conv1'].append(ours_convert(cc, ['--out', str(tmp / 'w1'), '--workers', '1', *base], n))
        figures['conv2'].append(ours_convert(cc, ['--out', str(tmp / 'w2'), '--workers', '2', *base], n))
    jpegs = read_jpegs(tmp / 'w1')
    for _ in range(args.repeats):
        figures['base_load'].append(baseline_loader(jpegs, args.resolution, 16))
        figures['load0'].append(ours_loader(tmp / 'w1', args.resolution, 16, 0))
        figures['load2'].append(ours_loader(tmp / 'w1', args.resolution, 16, 2))
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f'\n{n} images ({args.per_source} per source), medians of {args.repeats} runs')
    print(f'{"measure":<44}{"median":>10}{"baseline":>10}{"ratio":>8}')
    rows = [('convert img/s, 1 worker', med['conv1'], med['base_conv']),
            ('convert img/s, 2 workers', med['conv2'], med['base_conv']),
            (f'dataloader samples/s @{args.resolution}px, 0 workers', med['load0'], med['base_load']),
            (f'dataloader samples/s @{args.resolution}px, 2 workers', med['load2'], med['base_load'])]
    for name, value, baseline in rows:
        print(f'{name:<44}{value:>10.1f}{baseline:>10.1f}{value / baseline:>8.2f}')
    print(f'dataloader (2 workers) / tiny model step rate ({args.step_rate} img/s, --step-rate): '
          f'{med["load2"] / args.step_rate:.1f}x')
    print(json.dumps({'images': n, 'convert_1w_imgs_per_s': round(med['conv1'], 1),
                      'convert_2w_imgs_per_s': round(med['conv2'], 1),
                      'convert_baseline_imgs_per_s': round(med['base_conv'], 1),
                      'convert_2w_ratio': round(med['conv2'] / med['base_conv'], 2),
                      'loader_0w_samples_per_s': round(med['load0'], 1),
                      'loader_2w_samples_per_s': round(med['load2'], 1),
                      'loader_baseline_samples_per_s': round(med['base_load'], 1),
                      'loader_2w_ratio': round(med['load2'] / med['base_load'], 2),
                      'loader_vs_step_rate': round(med['load2'] / args.step_rate, 1)}))


if __name__ == '__main__':
    main()
