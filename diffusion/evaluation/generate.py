"""Batch generation from a prompt file: PNGs, a JSONL manifest, a contact sheet; resumable.

``python run_generate.py checkpoint=outputs/RUN prompts='["a cat","a dog"]' [yamls/generate/X.yaml] [key=value ...]``
(``checkpoint``: a run folder, its ``checkpoints/`` folder or a .pt file; ``prompts``: inline or a file; the
output goes to ``outputs/RUN/generate`` unless ``out_dir`` is given; see diffusion/evaluation/run_args.py)

Layout of ``out_dir``::

    run.json           settings of the run (checked on resume: a different setting is an error)
    images/000000.png  one PNG per prompt (index = line / row / annotation order in the prompt file)
    manifest.jsonl     one JSON object per finished image: index, file, prompt, seed, guidance_scale, ...
    contact_sheet.png  a grid of the first ``contact_sheet`` images

Seeds: image ``i`` gets the seed ``s_i = seed + i`` and its own CPU generator ``torch.Generator().manual_seed(s_i)``,
which draws its starting noise and, for stochastic samplers, its per-step noise (``diffusion/samplers.py``). An
image therefore does not depend on the batch it was made in, and an exported diffusers pipeline reproduces a batch
with ``generator=[torch.Generator().manual_seed(s) for s in seeds]``.
Resuming skips every index already in the manifest whose PNG exists; a PNG is written to a temporary name and
renamed before its manifest line is appended.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from diffusion import samplers

log = logging.getLogger(__name__)

__all__ = ['GenerateConfig', 'read_prompts', 'generate_images', 'contact_sheet', 'run']

PROMPT_COLUMNS = ('prompt', 'Prompt', 'caption', 'Caption', 'text', 'Text')
# Settings that change the images: a resumed run must agree on all of them.
_IMAGE_SETTINGS = ('checkpoint', 'weights', 'prompts', 'prompt_column', 'seed', 'guidance_scale', 'guidance_rescale',
                   'negative_prompt', 'num_inference_steps', 'sampler', 'height', 'width', 'control_guidance_scale',
                   'micro_conditioning')
# Keyword arguments of LatentDiffusion.generate that come straight from the settings.
_GENERATE_KEYS = ('guidance_scale', 'num_inference_steps', 'sampler', 'height', 'width', 'guidance_rescale',
                  'negative_prompt', 'control_guidance_scale', 'micro_conditioning')


@dataclass
class GenerateConfig:
    """Top-level keys of a generation YAML (``yamls/generate/*.yaml``)."""
    checkpoint: str  # composer checkpoint file, its save folder, or the run folder (outputs/RUN)
    # inline ['a cat', 'a dog'], or a file: .txt (one per line), .csv / .tsv (a prompt column), COCO captions
    # .json, or .jsonl
    prompts: Any
    out_dir: Optional[str] = None  # default: beside the run, <run folder>/generate (-2, -3 for other settings)
    config: Optional[str] = None  # train config; default: config.yaml beside the checkpoint
    weights: str = 'auto'  # auto (EMA if present) | ema | training
    prompt_column: Optional[str] = None  # CSV/TSV column; default: the first of PROMPT_COLUMNS present
    limit: Optional[int] = None  # first N prompts only
    batch_size: int = 4
    seed: int = 0
    # sampler / num_inference_steps / guidance_scale: None takes the model's defaults (sampling_defaults: EDM
    # heun, 30, 5.0; DDPM ddim, 50, 7.5)
    guidance_scale: Optional[float] = None
    guidance_rescale: float = 0.0
    negative_prompt: Optional[str] = None
    # disentangled conditioning: a separate control guidance scale (three branches) and the control metadata to
    # ask for (original_size, crop_top_left, target_size, flip); see README "Conditioning and resolution transfer"
    control_guidance_scale: Optional[float] = None
    micro_conditioning: Optional[dict] = None
    num_inference_steps: Optional[int] = None
    sampler: Optional[str] = None
    height: Optional[int] = None  # default: the UNet's sample size times the VAE factor
    width: Optional[int] = None
    contact_sheet: int = 64  # images in the contact sheet (0: none)
    device: Optional[str] = None  # default: cuda if available
    allow_unsafe_pickle: bool = False
    model_overrides: list = field(default_factory=list)  # dotted overrides of the train config


# ---------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------
def _coco_captions(obj: Any) -> list[str]:
    if isinstance(obj, dict) and 'annotations' in obj:
        anns = sorted(obj['annotations'], key=lambda a: (a.get('image_id', 0), a.get('id', 0)))
        return [str(a['caption']).strip() for a in anns]
    if isinstance(obj, list):
        return [str(x if isinstance(x, str) else x.get('prompt', x.get('caption'))).strip() for x in obj]
    raise ValueError('JSON prompts must be COCO captions ({"annotations": [{"caption": ...}]}) or a list of '
                     'strings / {"prompt": ...} objects')


def read_prompts(path: str | Path, column: Optional[str] = None, limit: Optional[int] = None) -> list[str]:
    """Read prompts from a text, CSV/TSV (e.g. PartiPrompts' ``Prompt`` column), COCO JSON or JSONL file.

    Raises:
        ValueError: Unknown format, missing column, or no prompts; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'prompt file {path} does not exist')
    suffix = path.suffix.lower()
    text = path.read_text(encoding='utf-8')
    if suffix in ('.csv', '.tsv'):
        reader = csv.DictReader(text.splitlines(), delimiter='\t' if suffix == '.tsv' else ',')
        headers = reader.fieldnames or []
        name = column or next((c for c in PROMPT_COLUMNS if c in headers), None)
        if name is None or name not in headers:
            raise ValueError(f'{path}: no prompt column {column or PROMPT_COLUMNS!r} among the headers {headers}; '
                             'set prompt_column')
        prompts = [(row.get(name) or '').strip() for row in reader]
    elif suffix == '.json':
        prompts = _coco_captions(json.loads(text))
    elif suffix == '.jsonl':
        prompts = [_coco_captions([json.loads(line)])[0] for line in text.splitlines() if line.strip()]
    elif suffix in ('.txt', ''):
        prompts = [line.strip() for line in text.splitlines()]
    else:
        raise ValueError(f'{path}: unknown prompt file type {suffix!r}; use .txt, .csv, .tsv, .json or .jsonl')
    prompts = [p for p in prompts if p]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f'{path}: no prompts found')
    return prompts


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def default_size(model: Any) -> int:
    """Default image side: the UNet's latent ``sample_size`` times the autoencoder's downsampling factor."""
    unet = getattr(model.backbone, 'unet', None)
    latent = int(unet.config.sample_size) if unet is not None else int(getattr(model.backbone, 'sample_size', 32))
    return latent * model.autoencoder.downsample_factor


def generate_images(model: Any, prompts: Sequence[str], seeds: Sequence[int], *, guidance_scale: float,
                    num_inference_steps: int, sampler: str, height: int, width: int, guidance_rescale: float = 0.0,
                    negative_prompt: Optional[str] = None, control_guidance_scale: Optional[float] = None,
                    micro_conditioning: Optional[dict] = None) -> list[Image.Image]:
    """One batch: prompts + per-image seeds -> PIL images (image ``i`` depends on ``seeds[i]`` only)."""
    negatives = [negative_prompt] * len(prompts) if negative_prompt is not None else None
    return model.generate(list(prompts), negative_prompts=negatives, height=height, width=width,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, sampler=sampler, seed=[int(s) for s in seeds],
                          output_type='pil', control_guidance_scale=control_guidance_scale,
                          micro_conditioning=micro_conditioning)


def contact_sheet(paths: Sequence[Path], out: Path, max_images: int = 64, thumb: int = 128) -> Optional[Path]:
    """Grid of the first ``max_images`` images (PNG), or ``None`` when there are none."""
    paths = list(paths)[:max_images]
    if not paths:
        return None
    cols = math.ceil(math.sqrt(len(paths)))
    rows = math.ceil(len(paths) / cols)
    sheet = Image.new('RGB', (cols * (thumb + 2), rows * (thumb + 2)), 'white')
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert('RGB').resize((thumb, thumb), Image.BICUBIC)
        sheet.paste(im, ((i % cols) * (thumb + 2) + 1, (i // cols) * (thumb + 2) + 1))
    tmp = out.with_suffix(f'.tmp{os.getpid()}.png')
    sheet.save(tmp)
    os.replace(tmp, out)
    return out


def _read_manifest(path: Path) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding='utf-8').splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interruption: redo that image
                log.warning('%s: skipping a malformed manifest line', path)
                continue
            if (path.parent / entry['file']).exists():
                done[int(entry['index'])] = entry
    return done


def _check_run_json(out: Path, settings: dict[str, Any]) -> None:
    run_json = out / 'run.json'
    if run_json.exists():
        old = json.loads(run_json.read_text(encoding='utf-8'))
        diff = {k: (old.get(k), settings.get(k)) for k in _IMAGE_SETTINGS if old.get(k) != settings.get(k)}
        if diff:
            raise ValueError(f'{out} holds images made with other settings (old, new): {diff}. Use a new out_dir '
                             'or the old settings to resume.')
    else:
        out.mkdir(parents=True, exist_ok=True)
        run_json.write_text(json.dumps(settings, indent=2) + '\n', encoding='utf-8')


def generate_to_folder(model: Any, prompts: Sequence[str], out_dir: str | Path, settings: dict[str, Any],
                       batch_size: int = 4, progress: bool = True) -> list[dict[str, Any]]:
    """Generate every prompt not yet done into ``out_dir`` (resumable); returns the full manifest in order.

    ``settings`` holds the generation keys of :class:`GenerateConfig` (``seed``, ``guidance_scale``, ...,
    ``checkpoint``, ``weights``); they are recorded in ``run.json`` and in every manifest line.
    """
    from tqdm.auto import tqdm
    out = Path(out_dir)
    _check_run_json(out, settings)
    (out / 'images').mkdir(parents=True, exist_ok=True)
    manifest = out / 'manifest.jsonl'
    done = _read_manifest(manifest)
    todo = [i for i in range(len(prompts)) if i not in done]
    if done:
        log.info('%s: %d of %d images already done, resuming', out, len(done), len(prompts))
    gen_kw = {k: settings[k] for k in _GENERATE_KEYS if k in settings}
    record = {k: settings.get(k) for k in ('guidance_scale', 'control_guidance_scale', 'num_inference_steps',
                                           'sampler', 'height', 'width', 'checkpoint', 'weights')}
    with manifest.open('a', encoding='utf-8') as fh, tqdm(total=len(todo), desc='generating',
                                                           disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            seeds = [settings['seed'] + i for i in idx]
            images = generate_images(model, [prompts[i] for i in idx], seeds, **gen_kw)
            for i, seed, image in zip(idx, seeds, images):
                name = f'images/{i:06d}.png'
                tmp = out / f'images/.{i:06d}.tmp.png'
                image.save(tmp)
                os.replace(tmp, out / name)
                entry = {'index': i, 'file': name, 'prompt': prompts[i], 'seed': seed, **record}
                fh.write(json.dumps(entry) + '\n')
                fh.flush()
                done[i] = entry
            bar.update(len(idx))
    return [done[i] for i in range(len(prompts))]


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Load the checkpoint, generate every prompt into ``cfg.out_dir``, write the contact sheet.

    Returns:
        A summary: ``out_dir``, ``num_images``, ``num_new``, ``contact_sheet``, ``checkpoint`` info.
    """
    from diffusion.evaluation.run_args import (checkpoint_line, checkpoint_source, fresh_out_dir, inline_or_file_prompts,
                                               record_folder)
    if cfg.batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {cfg.batch_size}')
    inline = inline_or_file_prompts(cfg.prompts)
    prompts = inline[:cfg.limit] if inline else read_prompts(cfg.prompts, cfg.prompt_column, cfg.limit)
    cfg.checkpoint = checkpoint_source(cfg.checkpoint)
    from diffusion.checkpoints import load_model
    device = cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model, info = load_model(cfg.checkpoint, cfg.config, cfg.weights, device=device,
                             allow_unsafe=cfg.allow_unsafe_pickle, overrides=tuple(cfg.model_overrides))
    size = default_size(model)
    settings = {**dataclasses.asdict(cfg), 'height': cfg.height or size, 'width': cfg.width or size,
                'checkpoint': info.checkpoint, 'weights': info.weights,
                **samplers.resolve_sampling(model, cfg.sampler, cfg.num_inference_steps, cfg.guidance_scale)}
    if cfg.out_dir is None:
        cfg.out_dir = settings['out_dir'] = str(fresh_out_dir(record_folder(cfg.checkpoint) / 'generate', settings,
                                                              _IMAGE_SETTINGS))
    print(f'{checkpoint_line(info)}; images into {cfg.out_dir}', flush=True)
    before = len(_read_manifest(Path(cfg.out_dir) / 'manifest.jsonl'))
    entries = generate_to_folder(model, prompts, cfg.out_dir, settings, cfg.batch_size)
    sheet = None
    if cfg.contact_sheet > 0:
        sheet = contact_sheet([Path(cfg.out_dir) / e['file'] for e in entries], Path(cfg.out_dir) /
                              'contact_sheet.png', cfg.contact_sheet)
    return {'out_dir': cfg.out_dir, 'num_images': len(entries), 'num_new': len(entries) - before,
            'contact_sheet': str(sheet) if sheet else None, **info.as_dict()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``run_generate.py [YAML] key=value ...``: exit status 2 with a readable message on a config error."""
    from diffusion.config import run_cli
    summary, status = run_cli(argv, 'python run_generate.py [yamls/generate/CONFIG.yaml] checkpoint=outputs/RUN '
                              'prompts=\'["a cat","a dog"]\'|FILE [key=value ...]',
                              GenerateConfig, run)
    if summary is None:
        return status
    print(f'generated {summary["num_new"]} new images ({summary["num_images"]} in all) in {summary["out_dir"]} '
          f'from {summary["checkpoint"]} ({summary["weights"]} weights); contact sheet: {summary["contact_sheet"]}')
    return 0
