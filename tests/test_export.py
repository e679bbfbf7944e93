"""Checkpoint loading (weights-only, EMA) and export to diffusers pipelines that reproduce ``generate()``.

``trained_run`` (also used by test_generate.py and test_eval.py) trains the tiny config for 2 batches with
composer's EMA and returns the save folder; it is built once per test session.
"""
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.checkpoints import load_checkpoint_state, load_model, model_weights

REPO = Path(__file__).resolve().parents[1]
_RUNS: dict = {}


def trained_run(tmp_path_factory, demo_photos) -> Path:
    """Save folder of a 2-batch tiny-cpu run with EMA (config.yaml + composer checkpoints)."""
    if 'run' not in _RUNS:
        from diffusion.config import load_config
        from diffusion.training.train import build_trainer
        raw = OmegaConf.to_container(OmegaConf.load(REPO / 'yamls/tiny-cpu.yaml'))
        raw['callbacks'] = {}
        raw['eval_loader'] = None
        raw['algorithms'] = {'ema': {'half_life': '1ba'}}
        out = tmp_path_factory.mktemp('tiny_ema_run')
        over = [f'variables.data={demo_photos}', f'save_folder={out}', 'max_duration=2ba', 'save_interval=2ba',
                'global_train_batch_size=4', 'scheduler.t_warmup=0ba', 'log_to_console=false']
        trainer = build_trainer(load_config(base=raw, overrides=over))
        trainer.fit()
        trainer.close()
        _RUNS['run'] = out
    return _RUNS['run']


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, demo_photos):
    return trained_run(tmp_path_factory, demo_photos)


@pytest.fixture(scope='module')
def loaded(run_dir):
    return load_model(run_dir)


def test_checkpoint_loads_weights_only(run_dir):
    ckpt = run_dir / 'latest-rank0.pt'
    state = load_checkpoint_state(ckpt)  # weights_only=True with the small allow-list
    assert 'model' in state['state']
    # Without the allow-list torch refuses composer's checkpoint: the allow-list is what makes it load.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, map_location='cpu', weights_only=True)


def test_ema_and_training_weights_differ(run_dir, loaded):
    model, info = loaded
    assert info.has_ema and info.weights == 'ema' and info.batch == 2
    state = load_checkpoint_state(run_dir / 'latest-rank0.pt')
    ema, _, _ = model_weights(state, 'ema')
    train, chosen, _ = model_weights(state, 'training')
    key = 'backbone.unet.conv_in.weight'
    assert chosen == 'training'
    assert not torch.equal(ema[key], train[key])
    torch.testing.assert_close(model.state_dict()[key], ema[key], rtol=0, atol=0)
    # The frozen encoders are in neither (checkpoints leave them out; tests/test_checkpoints.py).
    assert not [k for k in (*ema, *train) if k.startswith(('text_encoder.', 'autoencoder.'))]


def test_missing_config_is_a_clear_error(run_dir, tmp_path):
    lone = tmp_path / 'x.pt'
    lone.symlink_to(run_dir / 'latest-rank0.pt')
    with pytest.raises(FileNotFoundError, match='config.yaml'):
        load_model(lone)


def _compare(model, pipe, prompts, negative_prompt=None, sampler='ddim', **kw):
    ours = model.generate(prompts, negative_prompts=negative_prompt, seed=7, output_type='pt', sampler=sampler, **kw)
    theirs = pipe(prompts, negative_prompt=negative_prompt, generator=torch.Generator().manual_seed(7),
                  output_type='pt', **kw).images
    return (ours - theirs.to(ours.dtype)).abs().max().item(), ours


# the pipeline would otherwise print a deprecation notice with the whole scheduler config (steps_offset 0 -> 1)
@pytest.mark.filterwarnings('error::FutureWarning')
def test_export_sd_reproduces_generate(loaded, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from diffusion.export.to_diffusers import export_pipeline
    model, info = loaded
    out = export_pipeline(model, tmp_path / 'pipe', sampler='ddim', metadata=info.as_dict())
    assert not [p for p in out.rglob('*') if p.suffix in ('.bin', '.pt', '.ckpt')]
    assert (out / 'unet' / 'diffusion_pytorch_model.safetensors').exists()
    meta = json.loads((out / 'commoncanvas_export.json').read_text())
    assert meta['weights'] == 'ema' and meta['pipeline'] == 'StableDiffusionPipeline'
    pipe = DiffusionPipeline.from_pretrained(out)  # offline: a local folder only
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.tokenizer.model_max_length == model.text_encoder.max_length
    assert pipe.vae.config.scaling_factor == pytest.approx(model.scaling_factor)
    pipe.set_progress_bar_config(disable=True)
    prompts = ['a cat sitting on a sofa', 'coffee']
    for scale in (1.0, 4.0):
        diff, ours = _compare(model, pipe, prompts, height=64, width=64, num_inference_steps=3,
                              guidance_scale=scale)
        assert diff < 1e-3, f'guidance {scale}: exported pipeline differs by {diff}'
    assert ours.std() > 0.01
    # The BERT attention mask matters: without config.use_attention_mask the pipeline's images differ.
    pipe.text_encoder.config.use_attention_mask = False
    diff, _ = _compare(model, pipe, prompts, height=64, width=64, num_inference_steps=3, guidance_scale=4.0)
    assert diff > 1e-3


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f'{record.name}: {record.getMessage()}')


@pytest.fixture
def library_warnings():
    """Warnings the diffusers and transformers loggers (which do not propagate to the root) emit."""
    records = _Records()
    for name in ('diffusers', 'transformers'):
        logging.getLogger(name).addHandler(records)
    yield records.messages
    for name in ('diffusers', 'transformers'):
        logging.getLogger(name).removeHandler(records)


def test_reloading_a_bert_export_warns_of_nothing(loaded, tmp_path, library_warnings, recwarn):
    from diffusers import DiffusionPipeline

    from diffusion.export.to_diffusers import export_pipeline, load_pipeline
    model, info = loaded
    out = export_pipeline(model, tmp_path / 'pipe', sampler='ddim', metadata=info.as_dict())
    assert library_warnings == []  # the export itself
    pipe = load_pipeline(out)
    assert library_warnings == [] and [str(w.message) for w in recwarn] == []
    assert type(pipe.text_encoder).__name__ == 'BertModel'
    pipe.set_progress_bar_config(disable=True)
    diff, _ = _compare(model, pipe, ['a cat sitting on a sofa', 'coffee'], height=64, width=64,
                       num_inference_steps=3, guidance_scale=4.0)
    assert diff < 1e-3, f'the reloaded pipeline differs by {diff}'
    # Plain diffusers gives the stock class's one notice (text_encoder annotated CLIPTextModel), and only that.
    DiffusionPipeline.from_pretrained(out)
    assert len(library_warnings) == 1 and 'Expected types for text_encoder' in library_warnings[0], library_warnings


@pytest.mark.parametrize('sampler', ['euler_ancestral', 'ddpm'])
def test_export_reproduces_per_image_seeds_with_stochastic_samplers(loaded, sampler):
    """The generator convention: per-image seeds here = one CPU generator per image in the diffusers pipeline,
    for the starting noise and for the noise stochastic samplers draw at every step."""
    from diffusion.export.to_diffusers import to_diffusers_pipeline
    model, _ = loaded
    pipe = to_diffusers_pipeline(model, sampler=sampler)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ['a cat sitting on a sofa', 'coffee'], [21, 5]
    kw = dict(height=64, width=64, num_inference_steps=3, guidance_scale=3.0)
    ours = model.generate(prompts, seed=seeds, sampler=sampler, output_type='pt', **kw)
    theirs = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type='pt', **kw).images
    assert (ours - theirs.to(ours.dtype)).abs().max().item() < 1e-3
    # The second image alone, as the pipeline would make it alone: the batch does not matter.
    alone = pipe(prompts[1:], generator=[torch.Generator().manual_seed(5)], output_type='pt', **kw).images
    assert (ours[1:] - alone.to(ours.dtype)).abs().max().item() < 1e-3


def test_export_sdxl_reproduces_generate(tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    from diffusion import registry
    from diffusion.export.to_diffusers import export_pipeline
    from diffusion.builders import import_components
    import_components()
    model = registry.build(registry.models, {
        'name': 'latent_diffusion', 'use_time_ids': True,
        'autoencoder': {'name': 'autoencoder_kl', 'config': 'tiny'},
        'text_encoder': {'name': 'tiny_clip', 'pair': True, 'hidden_size': 32, 'projection_dim': 32},
        'backbone': {'name': 'unet', 'preset': 'mini-l', 'sample_size': 8, 'block_out_channels': [32, 64, 64],
                     'attention_head_dim': [2, 2, 2], 'transformer_layers_per_block': [1, 1, 1]},
        'noise_schedule': {'name': 'ddpm', 'prediction_type': 'v_prediction'},
    }, 'model').eval()
    out = export_pipeline(model, tmp_path / 'xl', sampler='euler')
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.config.force_zeros_for_empty_prompt is False  # the unconditional branch is the empty caption
    pipe.set_progress_bar_config(disable=True)
    diff, _ = _compare(model, pipe, ['a red rose', 'a lighthouse'], height=32, width=32, num_inference_steps=3,
                       guidance_scale=3.0, sampler='euler')
    assert diff < 1e-3, f'exported SDXL pipeline differs by {diff}'


def test_export_refuses_what_diffusers_cannot_reproduce(loaded):
    from diffusion.export.to_diffusers import ExportError, to_diffusers_pipeline
    model, _ = loaded
    model.use_text_mask = True
    try:
        with pytest.raises(ExportError, match='use_text_mask'):
            to_diffusers_pipeline(model)
    finally:
        model.use_text_mask = False


def test_export_cli(run_dir, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location('export_diffusers', REPO / 'convert/export_diffusers.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(['--checkpoint', str(run_dir), '--out', str(tmp_path / 'cli'), '--weights', 'training']) == 0
    meta = json.loads((tmp_path / 'cli' / 'commoncanvas_export.json').read_text())
    assert meta['weights'] == 'training' and meta['has_ema'] is True
    assert cli.main(['--checkpoint', str(tmp_path / 'nope'), '--out', str(tmp_path / 'x')]) == 2
