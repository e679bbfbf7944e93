"""What the studies (``scripts/leakage_study.py``, ``scripts/transfer_study.py``) share: train from the tiny config,
sample, score against a held-out reference.

The runs start from the repository's ``yamls/tiny-cpu.yaml`` (the package is used from its checkout, installed
editable).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

__all__ = ['TINY_CPU_YAML', 'train_config', 'train', 'Reference', 'reference_set', 'sample', 'parse_study_args']

TINY_CPU_YAML = Path(__file__).resolve().parents[2] / 'yamls' / 'tiny-cpu.yaml'


def train_config(data: str, resolution: int, steps: int, out: Path, autoencoder: Optional[str],
                 overrides: dict[str, str], eval_batches: int = 8, batch_size: int = 16,
                 use_latents: bool = False, lr: float = 1e-3) -> Any:
    """``yamls/tiny-cpu.yaml`` at ``resolution`` on ``data`` for ``steps`` batches of ``batch_size``, without
    sample callbacks, with a cosine learning-rate decay to 0.1x (so the last weights are not a noisy constant-LR
    iterate); validation loss on the first ``eval_batches`` eval batches of 32 (a fixed subset: the eval loader
    does not shuffle). ``use_latents``: train on the dataset's precomputed ``latents_<resolution>`` column
    (centre crops) instead of encoding randomly cropped / flipped pixels at every step."""
    from diffusion.config import load_config
    base = OmegaConf.to_container(OmegaConf.load(TINY_CPU_YAML))
    base['callbacks'] = {'speed_monitor': {'window_size': 10}}
    base['scheduler'] = {'name': 'cosine_with_warmup', 't_warmup': f'{min(20, max(1, steps // 10))}ba', 'alpha_f': 0.1}
    base['optimizer']['lr'] = lr
    over = {'variables.data': data, 'variables.resolution': str(resolution),
            'variables.run_name': out.name, 'model.backbone.sample_size': str(resolution // 4),
            'save_folder': str(out / 'checkpoints'), 'max_duration': f'{steps}ba', 'eval_interval': f'{steps}ba',
            'save_interval': f'{steps}ba', 'eval_first': 'false', 'console_log_interval': f'{max(1, steps // 10)}ba',
            'eval_subset_num_batches': str(eval_batches), 'global_train_batch_size': str(batch_size),
            'device_eval_batch_size': '32'}
    if use_latents:
        over.update({'train_loader.use_latents': 'true', 'eval_loader.use_latents': 'true',
                     'train_loader.random_flip': 'false', 'train_loader.crop': 'center'})
    if autoencoder:  # replaces the whole block (an override would merge `pretrained` into the tiny `config`)
        base['model']['autoencoder'] = {'name': 'autoencoder_kl', 'pretrained': str(autoencoder)}
    over.update(overrides)
    return load_config(base=base, overrides=[f'{k}={v}' for k, v in over.items()])


def train(cfg: Any) -> tuple[Any, float]:
    """Fit with a composer Trainer; returns the model (eval mode) and its final validation loss.

    A run whose last checkpoint (``save_folder/latest-rank0.pt``) is already at ``max_duration`` is not trained
    again: its full state is loaded and only the validation loss is computed.
    """
    from diffusion.training.train import build_trainer
    ckpt = Path(cfg.save_folder) / 'latest-rank0.pt'
    resumed = ckpt.exists() and not cfg.load_path
    if resumed:
        log.info('%s exists: loading it instead of training', ckpt)
        cfg.load_path, cfg.load_weights_only = str(ckpt), False
    trainer = build_trainer(cfg)  # loads load_path
    if resumed:
        trainer.eval()  # nothing left to fit (composer refuses a fit at max_duration)
    else:
        trainer.fit()
    val = float(trainer.state.eval_metrics['eval']['ValidationLoss'].compute())
    model = trainer.state.model.eval()
    trainer.close()
    return model, val


class Reference:
    """FID/KID reference of ``n`` held-out images at ``size`` px, Inception features computed on first use and
    cached in ``cache`` (so a rerun does not pay for them again)."""

    def __init__(self, data: str, n: Optional[int], size: int, cache: Path, inception: Optional[str] = None):
        from diffusion.evaluation.metrics import ImageMetrics
        self.data, self.size, self.cache = data, size, cache
        images, self.captions = reference_set(data, n, size)
        self.images = images
        self.metrics = ImageMetrics(kid_subset_size=min(len(images), 1000), kid_subsets=50, inception=inception)
        self._ready = False

    def __len__(self) -> int:
        return len(self.images)

    def score(self, generated: Sequence[Any]) -> dict[str, float]:
        if not self._ready:
            key = {'data': str(Path(self.data).resolve()), 'n': len(self.images), 'size': self.size}
            if self.cache.exists() and torch.load(self.cache)['key'] == key:
                self.metrics.kid.metric_state['real_features'].append(torch.load(self.cache)['features'])
            else:
                self.metrics.add_reference(self.images)
                feats = torch.cat(self.metrics.kid.metric_state['real_features'])
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({'key': key, 'features': feats}, self.cache)
            self._ready = True
        return _rounded_fid_kid(self.metrics, generated)


def reference_set(data: str, n: int, size: int) -> tuple[list, list[str]]:
    """``n`` eval images (centre-cropped to ``size``) and their captions."""
    from diffusion.evaluation.evaluate import load_reference
    images, captions = load_reference(data, 'eval', n, size)
    return images, [str(c or '') for c in captions]


def _rounded_fid_kid(metrics: Any, images: Sequence[Any]) -> dict[str, float]:
    scores = metrics.score(list(images))
    return {'fid': round(scores['fid'], 2), 'kid': round(scores['kid_mean'], 4)}


def sample(model: Any, prompts: Sequence[str], seeds: Sequence[int], resolution: int, steps: int, guidance: float,
           micro: Optional[dict[str, Any]] = None, batch: int = 16) -> list:
    """PIL images, one per (prompt, seed) pair, in order (DDIM, text guidance only: the control is the same in
    both branches)."""
    out = []
    seeds = list(seeds)
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            out += model.generate(list(prompts[i:i + batch]), height=resolution, width=resolution, sampler='ddim',
                                  num_inference_steps=steps, guidance_scale=guidance, seed=seeds[i:i + batch],
                                  micro_conditioning=micro, output_type='pil')
    return out


def parse_study_args(parser: Any, argv: Optional[Sequence[str]] = None) -> Any:
    """``argv`` parsed with the options every study takes added to ``parser`` (the evaluation's size, sampling,
    the autoencoder, the Inception file, threads), and the study's log set up."""
    parser.add_argument('--num-eval', type=int, default=None,
                        help='held-out images for FID/KID (default: all; 0: no FID/KID)')
    parser.add_argument('--eval-batches', type=int, default=8, help='validation-loss batches of 32 (fixed subset)')
    parser.add_argument('--sample-steps', type=int, default=20)
    parser.add_argument('--guidance', type=float, default=3.0)
    parser.add_argument('--autoencoder', default=None, help='diffusers AutoencoderKL folder (default: tiny random)')
    parser.add_argument('--inception', default=None, help='TorchScript Inception (default: the packaged one)')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    return args
