"""The command-line arguments ``run_generate.py`` and ``run_eval.py`` share, checked before the slow imports.

* ``checkpoint=``: a checkpoint file, a save folder (``outputs/RUN/checkpoints``) or a run folder
  (``outputs/RUN``, whose ``checkpoints/`` is then used); a path that does not exist is one line.
* ``prompts=``: a prompt file, or prompts inline: ``prompts='["a cat","a dog"]'``.
* ``out_dir=``: by default beside the chosen run (``outputs/RUN/generate``, ``outputs/RUN/eval``), never in
  another run's folder.
* ``reference=`` (evaluation): by default the run's own held-out set (its ``eval_loader`` data).

Kept import-light (omegaconf only), so a wrong path is reported in about a second.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from diffusion.config import ConfigError

__all__ = ['checkpoint_line', 'checkpoint_source', 'fresh_out_dir', 'inline_or_file_prompts', 'record_folder', 'run_reference',
           'small_eval_note']

# Fewer images than this make FID / KID a check of the machinery only (published numbers: 10,000-30,000).
MEANINGFUL_EVAL_IMAGES = 1000


def _holds_checkpoint(folder: Path) -> bool:
    return any(folder.glob('*.pt')) or any(p.is_dir() and (p / '.metadata').exists() for p in folder.iterdir())


def checkpoint_source(path: Optional[str]) -> str:
    """The checkpoint file or save folder that ``path`` (a file, save folder or run folder) names.

    Raises:
        ConfigError: The path does not exist, or is a folder with no checkpoint (one line, naming it).
    """
    if not path:
        raise ConfigError('give the run to use: checkpoint=outputs/RUN (a run folder, its checkpoints/ folder or a '
                          '.pt file)')
    p = Path(path)
    if not p.exists():
        raise ConfigError(f'checkpoint {path} does not exist (give a run folder such as outputs/RUN, its '
                          f'checkpoints/ folder or a .pt file)')
    if p.is_dir() and not _holds_checkpoint(p):
        if (p / 'checkpoints').is_dir() and _holds_checkpoint(p / 'checkpoints'):
            return str(p / 'checkpoints')
        raise ConfigError(f'checkpoint folder {path} holds no composer checkpoint (*.pt or a sharded folder)')
    return str(p)


def checkpoint_line(info: Any) -> str:
    """Which checkpoint and weights a command uses, in one line (from a ``CheckpointInfo``)."""
    ema = '' if info.has_ema else ', the run has no EMA'
    return f'using {info.checkpoint} ({info.weights} weights{ema}, batch {info.batch})'


def record_folder(source: str) -> Path:
    """The folder of a run's record for a checkpoint source: the save folder (a file's folder), or its parent
    when it is named ``checkpoints`` (the recipes' ``outputs/RUN/checkpoints``)."""
    p = Path(source)
    folder = p if p.is_dir() and not (p / '.metadata').exists() else p.parent
    return folder.parent if folder.name == 'checkpoints' else folder


def inline_or_file_prompts(value: Any) -> Optional[list[str]]:
    """Prompts given inline (a list), or None for a prompt file that exists.

    Raises:
        ConfigError: A prompt file that does not exist, or an empty list.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        prompts = [str(p).strip() for p in value if str(p).strip()]
        if not prompts:
            raise ConfigError('prompts: the list is empty')
        return prompts
    if not Path(str(value)).is_file():
        raise ConfigError(f'prompt file {value!r} does not exist; for prompts on the command line give a list: '
                          f'prompts=\'["a cat on a sofa","a dog"]\'')
    return None


def fresh_out_dir(base: Path, settings: dict[str, Any], keys: Sequence[str]) -> Path:
    """``base``, or ``base-2``, ``base-3``, ...: the first folder that is new or holds images made with the same
    ``settings`` (its ``run.json``), so a default output folder resumes but never mixes settings."""
    for i in range(1, 1000):
        folder = base if i == 1 else base.with_name(f'{base.name}-{i}')
        run_json = folder / 'run.json'
        if not run_json.exists():
            return folder
        old = json.loads(run_json.read_text(encoding='utf-8'))
        if all(old.get(k) == settings.get(k) for k in keys):
            return folder
    raise ConfigError(f'{base}: 999 output folders with other settings; give out_dir=...')


def run_reference(source: str, config: Optional[str] = None) -> tuple[str, Optional[str]]:
    """The run's own held-out images, (dataset folder, split): its ``eval_loader`` data (else its training data)
    as its ``config.yaml`` records.

    Raises:
        ConfigError: No config beside the checkpoint, or a config naming no local dataset.
    """
    from omegaconf import OmegaConf
    p = Path(source)
    cfg_path = Path(config) if config else (p if p.is_dir() else p.parent) / 'config.yaml'
    if not cfg_path.is_file():
        raise ConfigError(f'no {cfg_path} to read the run\'s held-out set from: give reference=DATASET_FOLDER')
    raw = OmegaConf.to_container(OmegaConf.load(cfg_path))
    for name in ('eval_loader', 'train_loader'):
        block = raw.get(name) or {}
        if block.get('local'):
            return str(block['local']), block.get('split')
    raise ConfigError(f'{cfg_path} names no local dataset: give reference=DATASET_FOLDER')


def small_eval_note(num_reference: int, num_generated: int) -> Optional[str]:
    """One plain line when the evaluation set is too small for FID / KID to mean anything, else None."""
    n = min(num_reference, num_generated)
    if n >= MEANINGFUL_EVAL_IMAGES:
        return None
    return (f'note: FID and KID from {n} images only check the machinery (both are biased and noisy below about '
            f'{MEANINGFUL_EVAL_IMAGES:,} images; published numbers use 10,000-30,000); KID std is 0 when one subset '
            f'holds every image')
