"""Export a trained ``LatentDiffusion`` as a diffusers pipeline that reproduces our ``generate()``.

* UNet without added conditioning (CommonCanvas-S style) -> ``StableDiffusionPipeline``.
* UNet with SDXL ``text_time`` conditioning (CommonCanvas-L style) -> ``StableDiffusionXLPipeline``.

What has to match for the exported pipeline to give our images (each is set here, and checked by
``tests/test_export.py``):

* tokenizer ``model_max_length`` = our ``TextEncoder.max_length`` (pipelines pad to it);
* the hidden layer: SD takes the last hidden state (``hidden_layer=-1``); SDXL always takes the penultimate one
  (``hidden_layer=-2``) and the pooled projection of its second encoder;
* the text attention mask: our ``TextEncoder`` masks padding for BERT-style encoders; the SD pipeline does so
  only when ``text_encoder.config.use_attention_mask`` is true, so it is set; CLIP encoders get no mask in both;
* the UNet's cross-attention mask (``use_text_mask``): diffusers pipelines never pass one, so such models
  cannot be exported faithfully and are refused;
* the scheduler: ``noise_schedule.make_scheduler(sampler)``, i.e. ``diffusers_config()`` for that sampler;
* the VAE ``scaling_factor`` = our model's ``scaling_factor``;
* SDXL: ``force_zeros_for_empty_prompt=False`` (we use the empty caption's states, not zeros);
* the seeds: our per-image seeds are the pipeline's list of CPU generators,
  ``generator=[torch.Generator().manual_seed(s) for s in seeds]`` (``diffusion/samplers.py``);
* the latent shift: SD/SDXL pipelines decode ``latents / scaling_factor``, so a model whose autoencoder has a
  ``shift_factor`` (SD3/Flux-style VAE) is refused.

MicroDiT (a transformer backbone) is not exported here: this module handles ``UNetBackbone`` models only and
says so for anything else.

A pipeline whose text encoder is not CLIP (MiniLM, a ``BertModel``) loads and reproduces our images, but diffusers
checks each loaded component against the stock pipeline class's ``__init__`` annotations, and
``StableDiffusionPipeline`` annotates ``text_encoder: CLIPTextModel``: ``from_pretrained`` logs one "Expected types
for text_encoder" warning. The saved folder already declares what it holds (``model_index.json``:
``["transformers", "BertModel"]``); only a custom pipeline class shipped as code in the folder could declare
otherwise, which the Hub loads only with ``trust_remote_code=True``. So the export stays a stock pipeline and
:func:`load_pipeline` loads it with that one message dropped where diffusers logs it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
from pathlib import Path
from typing import Any, Optional, Union

import diffusers
from torch import nn

log = logging.getLogger(__name__)

__all__ = ['ExportError', 'pipeline_kind', 'to_diffusers_pipeline', 'export_pipeline', 'load_pipeline']


class ExportError(ValueError):
    """The model cannot be expressed faithfully as a stock diffusers pipeline."""


def pipeline_kind(model: Any) -> str:
    """``'sd'`` or ``'sdxl'`` for a UNet model; :class:`ExportError` otherwise."""
    unet = getattr(model.backbone, 'unet', None)
    if unet is None:
        raise ExportError(f'export supports UNet backbones only; this model has a {type(model.backbone).__name__} '
                          'backbone: diffusers has no pipeline for it; export it natively with '
                          '`python -m diffusion.export.native` (safetensors + JSON config)')
    return 'sdxl' if unet.config.addition_embed_type == 'text_time' else 'sd'


def _tokenizer(tok: Any, max_length: int) -> Any:
    tok = copy.deepcopy(tok)
    tok.model_max_length = max_length
    return tok


def _is_clip(enc: nn.Module) -> bool:
    return 'CLIP' in type(enc).__name__


def _scheduler(model: Any, sampler: str) -> Any:
    scheduler = model.noise_schedule.make_scheduler(sampler)
    if not hasattr(diffusers, type(scheduler).__name__):
        raise ExportError(f'sampler {sampler!r} uses {type(scheduler).__name__}, which is not a diffusers class; '
                          'pick a sampler with a diffusers scheduler (e.g. euler or dpmpp_2m for EDM)')
    if not hasattr(scheduler, 'scale_model_input'):  # diffusers' flow-matching schedulers (SD3 / Flux pipelines)
        raise ExportError(f'{type(scheduler).__name__} has no scale_model_input / init_noise_sigma, which the SD and '
                          'SDXL pipelines call: a flow-matching model exports natively (`python -m '
                          'diffusion.export.native`)')
    config = scheduler.config
    if config.get('timestep_spacing') == 'leading' and config.get('steps_offset', 1) != 1:
        # StableDiffusionPipeline.__init__ rewrites steps_offset to 1 on every load, which shifts 'leading'
        # timesteps; 'trailing' and 'linspace' spacings do not use steps_offset.
        raise ExportError("timestep_spacing='leading' with steps_offset != 1 cannot be exported: diffusers' SD "
                          "pipelines force steps_offset=1 when they load. Use 'trailing' (the default) or 'linspace'.")
    if 'steps_offset' in config and config['steps_offset'] != 1:
        # the pipeline would set it to 1 itself, printing a deprecation notice with the whole scheduler config;
        # the other spacings never read it, so setting it first changes no timestep.
        scheduler.register_to_config(steps_offset=1)
    return scheduler


def _check_common(model: Any) -> None:
    if model.autoencoder is None or model.text_encoder is None:
        raise ExportError('export needs the model\'s autoencoder and text encoder (the config must name both)')
    if model.use_text_mask:
        raise ExportError('this model cross-attends with a text padding mask (use_text_mask: true); diffusers '
                          'pipelines never pass encoder_attention_mask to the UNet, so an export would not '
                          'reproduce it. Train with use_text_mask: false to export.')
    if getattr(model, 'shift_factor', 0.0):
        raise ExportError(f'this model shifts its latents (autoencoder shift_factor {model.shift_factor}, SD3/Flux-'
                          'style VAE); the SD and SDXL pipelines decode latents / scaling_factor without the shift, '
                          'so an export would not reproduce its images')
    if getattr(model.backbone, 'conditioning', None) == 'disentangled':
        raise ExportError('this UNet adds a noise-gated control embedding (conditioning: disentangled) that diffusers '
                          'pipelines do not compute, so an export would not reproduce its images')


def _sd_parts(model: Any) -> dict[str, Any]:
    te = model.text_encoder
    if len(te.encoders) != 1:
        raise ExportError('StableDiffusionPipeline takes one text encoder; this model has '
                          f'{len(te.encoders)}')
    if te.hidden_layer != -1:
        raise ExportError(f'StableDiffusionPipeline reads the last hidden state (clip_skip also applies CLIP\'s '
                          f'final layer norm); this model uses hidden_layer={te.hidden_layer}')
    if te.pooled_mode != 'none' and model.backbone.uses_added_conditioning:
        raise ExportError('pooled text conditioning needs the SDXL pipeline')
    enc = te.encoders[0]
    if not _is_clip(enc):
        # The SD pipeline passes the tokenizer's mask only when the encoder's config asks for it.
        enc.config.use_attention_mask = True
    return {'text_encoder': enc, 'tokenizer': _tokenizer(te.tokenizers[0], te.max_length)}


def _sdxl_parts(model: Any) -> dict[str, Any]:
    te = model.text_encoder
    if te.hidden_layer != -2 or te.pooled_mode != 'projection' or not all(_is_clip(e) for e in te.encoders):
        raise ExportError('StableDiffusionXLPipeline reproduces only SDXL-style text encoding: CLIP encoders '
                          '(one CLIPTextModelWithProjection, or CLIPTextModel + CLIPTextModelWithProjection), '
                          'penultimate hidden states (hidden_layer=-2) and the projection as pooled text '
                          f'(pooled=projection). This model: {[type(e).__name__ for e in te.encoders]}, '
                          f'hidden_layer={te.hidden_layer}, pooled={te.pooled_mode}')
    if len(te.encoders) == 1:
        return {'text_encoder': None, 'tokenizer': None, 'text_encoder_2': te.encoders[0],
                'tokenizer_2': _tokenizer(te.tokenizers[0], te.max_length)}
    if len(te.encoders) != 2:
        raise ExportError(f'SDXL takes one or two text encoders, this model has {len(te.encoders)}')
    return {'text_encoder': te.encoders[0], 'tokenizer': _tokenizer(te.tokenizers[0], te.max_length),
            'text_encoder_2': te.encoders[1], 'tokenizer_2': _tokenizer(te.tokenizers[1], te.max_length)}


def to_diffusers_pipeline(model: Any, sampler: str = 'ddim') -> Any:
    """Wrap a trained model's modules (shared, not copied) in a diffusers pipeline.

    Args:
        model: A ``LatentDiffusion`` with a ``UNetBackbone``, autoencoder and text encoder.
        sampler: Sampler name of the model's noise schedule; becomes the pipeline's scheduler.

    Returns:
        A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.

    Raises:
        ExportError: The model uses something the stock pipeline cannot reproduce (reason in the message).
    """
    kind = pipeline_kind(model)
    _check_common(model)
    vae = model.autoencoder.vae
    vae.register_to_config(scaling_factor=model.scaling_factor)
    common = {'vae': vae, 'unet': model.backbone.unet, 'scheduler': _scheduler(model, sampler)}
    if kind == 'sd':
        return diffusers.StableDiffusionPipeline(**common, **_sd_parts(model), safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    if not model.use_time_ids:
        raise ExportError('SDXL-style UNets need use_time_ids: true (the pipeline always passes size time ids)')
    pipe = diffusers.StableDiffusionXLPipeline(**common, **_sdxl_parts(model), force_zeros_for_empty_prompt=False,
                                               add_watermarker=False)
    return pipe


def export_pipeline(model: Any, out_dir: Union[str, Path], sampler: str = 'ddim',
                    metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write a diffusers pipeline folder with safetensors weights (and ``commoncanvas_export.json``).

    Args:
        model: The trained model (load it with :func:`diffusion.checkpoints.load_model`).
        out_dir: Output folder (created; existing pipeline files are overwritten).
        sampler: Scheduler saved with the pipeline.
        metadata: Provenance written to ``commoncanvas_export.json`` (checkpoint, weights, sampler, ...).

    Returns:
        The folder; load it with ``DiffusionPipeline.from_pretrained(out_dir)``.
    """
    out = Path(out_dir)
    pipe = to_diffusers_pipeline(model, sampler)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    pickled = [p for p in out.rglob('*') if p.suffix in ('.bin', '.pt', '.pth', '.ckpt')]
    if pickled:
        raise ExportError(f'export wrote pickled weights {pickled}; only safetensors are allowed')
    info = {'pipeline': type(pipe).__name__, 'sampler': sampler,
            'scaling_factor': model.scaling_factor, 'text_max_length': model.text_encoder.max_length,
            **(metadata or {})}
    (out / 'commoncanvas_export.json').write_text(json.dumps(info, indent=2) + '\n', encoding='utf-8')
    log.info('exported %s to %s', type(pipe).__name__, out)
    return out


class _DeclaredTextEncoderNotice(logging.Filter):
    """Drops diffusers' notice that the stock SD pipeline annotates ``text_encoder: CLIPTextModel`` when the loaded
    text encoder is exactly the class the folder's ``model_index.json`` declares; any other type notice passes."""

    def __init__(self, declared: str) -> None:
        super().__init__()
        self._notice = re.compile(r"Expected types for text_encoder: \(<class '[\w.]+\.CLIPTextModel'>,\), got "
                                  rf"<class 'transformers\.[\w.]+\.{re.escape(declared)}'>\.")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._notice.fullmatch(record.getMessage())


@contextlib.contextmanager
def _declared_text_encoder_quiet(folder: Path):
    index = json.loads((folder / 'model_index.json').read_text())
    library, declared = (index.get('text_encoder') or [None, None])[:2]
    if library != 'transformers' or not declared or declared == 'CLIPTextModel':
        yield
        return
    pipeline_log = logging.getLogger('diffusers.pipelines.pipeline_utils')  # where diffusers logs the notice
    notice = _DeclaredTextEncoderNotice(declared)
    pipeline_log.addFilter(notice)
    try:
        yield
    finally:
        pipeline_log.removeFilter(notice)


def load_pipeline(folder: Union[str, Path], **kwargs: Any) -> Any:
    """``diffusers.DiffusionPipeline.from_pretrained(folder, **kwargs)`` for a folder :func:`export_pipeline`
    wrote, without the type notice a non-CLIP text encoder gives (see the module's docstring)."""
    with _declared_text_encoder_quiet(Path(folder)):
        return diffusers.DiffusionPipeline.from_pretrained(str(folder), **kwargs)
