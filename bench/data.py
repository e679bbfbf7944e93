"""Data pipeline throughput: each ratio compares equal work measured in the same run.

1. Conversion (images/s): the mini catalog's conversion (``convert/commoncatalog_mini.py``: sanitise, render SVG,
   resize, JPEG-encode, write resumable MDS) over the same listed items with 1 and 2 worker processes, and a
   plain loop (open, render SVG, RGB, thumbnail, JPEG-encode, no dataset written) over the same items. Every
   rate counts only the images the pipeline keeps (a licence-excluded item is neither counted nor given to the
   plain loop), and listing the sources, a fixed cost per run, is timed on its own row, outside every rate.
   Ratios: ``convert_1w_over_plain`` (one worker / plain loop) and ``convert_2w_over_1w`` (two workers / one).
2. Dataloader (samples/s): the ``image_caption`` loader (random crop, flip, batch 16) with 0 and 2 workers versus
   a plain loop that decodes the same stored JPEGs, crops and builds tensors; and the loader against the
   training step rate of ``yamls/tiny-cpu.yaml``'s model on the same batches, measured here in the same run.

Conversions run first (the worker pool forks; torch's thread pools must not have started yet), in interleaved
repeats (order rotated every repeat) so machine load hits all alike; medians are reported, both wall-clock and
CPU time of this process and its children. Prints a table and, last, one JSON line.

Usage: python bench/data.py [--per-source 100] [--repeats 3] [--cache-dir data/cache]
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
from PIL import Image

from diffusion.data.sanitize import render_svg

REPO = Path(__file__).resolve().parents[1]


def load_convert_script(name: str) -> ModuleType:
    """``convert/<name>.py`` as a module (a script of this repository, not part of the library)."""
    spec = importlib.util.spec_from_file_location(f'convert_{name}', REPO / 'convert' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu() -> float:
    """CPU seconds of this process and its finished children (workers are joined before a timing ends)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - wall, _cpu() - cpu


def plain_convert(paths: list[str], size: int) -> None:
    """Plain loop: open (render SVG), RGB, thumbnail, JPEG-encode."""
    for path in paths:
        data = Path(path).read_bytes()
        if path.endswith('.svg'):
            data = render_svg(data, size)
        image = Image.open(io.BytesIO(data)).convert('RGB')
        image.thumbnail((size, size))
        image.save(io.BytesIO(), format='JPEG', quality=90)


def plain_loader(jpegs: list[bytes], resolution: int, batch: int) -> None:
    """Plain loop: decode, resize, random crop, flip, to tensor, stack."""
    import torch
    rng = np.random.default_rng(0)
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


def loader_spec(out: Path, resolution: int, batch: int, workers: int) -> Any:
    from diffusion.data.dataset import build_image_caption_dataloader
    return build_image_caption_dataloader(batch, local=str(out), split='train', resolution=resolution, crop='random',
                                          random_flip=True, caption_dropout=0.1, num_workers=workers, drop_last=False)


def read_jpegs(out: Path) -> list[bytes]:
    """The stored JPEG bytes of every row of ``out/train``, exactly as stored."""
    from diffusion.data.mds_rows import RowReader
    reader = RowReader(out, 'train')
    return [reader.raw(i)['image'] for i in range(len(reader))]


def step_rate(out: Path, resolution: int, batch: int, steps: int) -> float:
    """Training samples/s of ``yamls/tiny-cpu.yaml``'s model (forward, loss, backward, AdamW) on this data."""
    import torch

    from diffusion import registry
    from diffusion.config import load_config
    from diffusion.builders import import_components
    import_components()
    cfg = load_config(REPO / 'yamls' / 'tiny-cpu.yaml', [f'variables.data={out}', f'variables.resolution={resolution}',
                                                         f'model.backbone.sample_size={resolution // 4}'])
    torch.manual_seed(0)
    model = registry.build(registry.models, cfg.model, 'model')
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = list(loader_spec(out, resolution, batch, 0).dataloader)
    times = []
    for i in range(steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        b = batches[i % len(batches)]
        loss = model.loss(model(b), b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(len(b['caption']) / (time.perf_counter() - start))
    return statistics.median(times)


def bench_convert(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, list[tuple[float, float]]], int, float]:
    """Interleaved conversion timings; returns (timings per mode, kept images, listing seconds)."""
    cc = load_convert_script('commoncatalog_mini')
    base = ['--cache-dir', args.cache_dir, '--max-per-source', str(args.per_source), '--size', str(args.size),
            '--eval-fraction', '0', '--overwrite']
    list_args = cc.parse_args(['--out', str(tmp / 'x'), *base])
    listing, _ = timed(lambda: cc.list_items(list_args))
    items = cc.list_items(list_args)
    run_args = {w: cc.parse_args(['--out', str(tmp / f'w{w}'), '--workers', str(w), *base]) for w in (1, 2)}
    report = cc.convert(run_args[1], items)  # warm-up; tells which items the pipeline keeps
    with open(tmp / 'w1' / 'attribution.csv', newline='', encoding='utf-8') as f:
        kept_keys = {row['key'] for row in csv.DictReader(f)}
    paths = [item.path for item in items if item.key in kept_keys]
    assert len(paths) == report['kept'], (len(paths), report['kept'])
    modes: dict[str, Callable[[], Any]] = {
        'plain': lambda: plain_convert(paths, args.size),
        'conv1': lambda: cc.convert(run_args[1], items),
        'conv2': lambda: cc.convert(run_args[2], items),
    }
    figures: dict[str, list[tuple[float, float]]] = {k: [] for k in modes}
    order = list(modes)
    for r in range(args.repeats):
        for name in order[r % 3:] + order[:r % 3]:
            figures[name].append(timed(modes[name]))
    return figures, report['kept'], listing


def bench_loader(args: argparse.Namespace, out: Path) -> dict[str, list[tuple[float, float]]]:
    jpegs = read_jpegs(out)
    modes = {'plain_load': lambda: plain_loader(jpegs, args.resolution, 16)}
    for w in (0, 2):  # built outside the timing, as a training run builds its loader once
        spec = loader_spec(out, args.resolution, 16, w)
        modes[f'load{w}'] = (lambda spec=spec: sum(1 for _ in spec.dataloader))
    figures: dict[str, list[tuple[float, float]]] = {k: [] for k in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            figures[name].append(timed(fn))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--per-source', type=int, default=100,
                        help='images per source (enough that fixed costs such as starting the pool do not dominate)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--resolution', type=int, default=64)
    parser.add_argument('--steps', type=int, default=5, help='timed training steps for the step rate')
    parser.add_argument('--cache-dir', default=str(REPO / 'data' / 'cache'))
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix='bench_data_'))
    conv, n, listing = bench_convert(args, tmp)
    load = bench_loader(args, tmp / 'w1')
    step = step_rate(tmp / 'w1', args.resolution, 16, args.steps)
    rate = {k: statistics.median(n / wall for wall, _ in v) for k, v in conv.items()}
    rate |= {k: statistics.median(n / wall for wall, _ in v) for k, v in load.items()}
    cpu = {k: statistics.median(cpu for _, cpu in v) for k, v in conv.items()}
    print(f'\n{n} kept images ({args.per_source} per source), medians of {args.repeats} interleaved runs; '
          f'load average {load_start:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
    print(f'{"measure":<46}{"per s":>9}{"vs":>16}{"ratio":>8}{"CPU s":>8}')
    rows = [('convert, plain PIL loop', rate['plain'], '', 1.0, cpu['plain']),
            ('convert, 1 worker', rate['conv1'], 'plain loop', rate['conv1'] / rate['plain'], cpu['conv1']),
            ('convert, 2 workers', rate['conv2'], '1 worker', rate['conv2'] / rate['conv1'], cpu['conv2']),
            (f'dataloader @{args.resolution}px, plain loop', rate['plain_load'], '', 1.0, float('nan')),
            (f'dataloader @{args.resolution}px, 0 workers', rate['load0'], 'plain loop',
             rate['load0'] / rate['plain_load'], float('nan')),
            (f'dataloader @{args.resolution}px, 2 workers', rate['load2'], 'plain loop',
             rate['load2'] / rate['plain_load'], float('nan')),
            ('tiny-cpu training step (samples/s)', step, '', float('nan'), float('nan')),
            ('dataloader 2 workers vs training step', rate['load2'], 'train step', rate['load2'] / step, float('nan'))]
    for name, value, versus, ratio, cpu_s in rows:
        print(f'{name:<46}{value:>9.1f}{versus:>16}{ratio:>8.2f}{cpu_s:>8.2f}')
    print(f'listing the sources (once per run, not in any rate): {listing:.2f} s')
    print(json.dumps({'images': n, 'listing_s': round(listing, 2),
                      'convert_plain_imgs_per_s': round(rate['plain'], 1),
                      'convert_1w_imgs_per_s': round(rate['conv1'], 1), 'convert_2w_imgs_per_s': round(rate['conv2'], 1),
                      'convert_1w_over_plain': round(rate['conv1'] / rate['plain'], 2),
                      'convert_2w_over_1w': round(rate['conv2'] / rate['conv1'], 2),
                      'loader_plain_samples_per_s': round(rate['plain_load'], 1),
                      'loader_0w_samples_per_s': round(rate['load0'], 1),
                      'loader_2w_samples_per_s': round(rate['load2'], 1),
                      'train_step_samples_per_s': round(step, 1),
                      'loader_2w_over_train_step': round(rate['load2'] / step, 1),
                      'load_average': [round(load_start, 1), round(os.getloadavg()[0], 1)]}))


if __name__ == '__main__':
    main()
