"""Every training recipe in yamls/ (and its recipe folders) validates as written and builds at tiny size in the
mode it runs in: the same loader (precomputed latents stay latents, read from a real precomputed dataset), the
same model class and components; its precision and FSDP blocks are checked, then only sizes are shrunk."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.config import load_config, load_yaml
from diffusion.builders import build_components, fsdp_config

REPO = Path(__file__).resolve().parents[1]
RES = 32  # pixels; the tiny autoencoder downsamples 4x: 8x8 latents
NOT_TRAIN_CONFIGS = ('generate', 'eval')

# Training recipes: yamls/*.yaml and one level of recipe folders (commoncanvas/, microdit/, demo/).
YAMLS = sorted(str(p.relative_to(REPO / 'yamls')) for p in (REPO / 'yamls').glob('*.yaml')) + \
    sorted(str(p.relative_to(REPO / 'yamls')) for p in (REPO / 'yamls').glob('*/*.yaml')
           if p.parent.name not in NOT_TRAIN_CONFIGS)
MINI_PRESETS = {'sd2-base': 'mini-s', 'sdxl-base': 'mini-l', 'microdit-xl-2': 'microdit-mini',
                'microdit-tiny-2': 'microdit-mini'}
TINY_TEXT = {'clip': {'name': 'tiny_clip'}, 'sdxl_clip_pair': {'name': 'tiny_clip', 'pair': True}}


@pytest.fixture(scope='module')
def tiny_vae(tmp_path_factory) -> Path:
    """A saved random AutoencoderKL: recipes that load their VAE by name load this folder instead."""
    from diffusers import AutoencoderKL

    from diffusion.models.autoencoders import TINY_VAE_CONFIG
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp('tiny_vae')
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def latents(tiny_vae, demo_photos, tmp_path_factory):
    """Precomputed latent datasets of the demo photos, one per text encoder (convert/precompute_latents.py)."""
    spec = importlib.util.spec_from_file_location('precompute_cli', REPO / 'convert' / 'precompute_latents.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    made: dict[str, Path] = {}

    def get(text_encoder: dict) -> Path:
        key = json.dumps(text_encoder, sort_keys=True)
        if key not in made:
            out = tmp_path_factory.mktemp('latents')
            extra = {k: v for k, v in text_encoder.items() if k != 'name'}
            args = ['--src', str(demo_photos), '--out', str(out), '--vae', str(tiny_vae), '--resolutions', str(RES),
                    '--text-encoder', text_encoder['name'], '--text-encoder-kwargs', json.dumps(extra),
                    '--batch-size', '8', '--device', 'cpu']
            assert cli.main(args) == 0
            made[key] = out
        return made[key]
    return get


def _shrink_loader(block: dict, data: Path) -> None:
    block.update(remote=None, local=str(data), resolution=RES, num_workers=0, persistent_workers=False,
                 prefetch_factor=None)
    if block.get('use_latents') not in (None, False):
        block['use_latents'] = True  # latents_<RES>


def _shrink_model(model: dict, tiny_vae: Path) -> None:
    if model.get('name') == 'autoencoder_kl_training' and isinstance(model.get('config'), dict):
        levels = len(model['config']['block_out_channels'])
        model['config'].update(block_out_channels=[min(32 * (i + 1), 64) for i in range(levels)], layers_per_block=1,
                               norm_num_groups=16)
        if model.get('discriminator'):
            model['discriminator'] = {'channels': 16, 'num_layers': 2}
        return
    if model.get('name') != 'latent_diffusion':
        return
    ae = model.get('autoencoder') or {}
    if ae.get('pretrained'):
        model['autoencoder'] = {'name': 'autoencoder_kl', 'pretrained': str(tiny_vae)}
    te = model.get('text_encoder') or {}
    if te.get('name') in TINY_TEXT:
        model['text_encoder'] = dict(TINY_TEXT[te['name']])
    backbone = model['backbone']
    if backbone.get('attention') == 'xformers':  # CUDA only; the recipe's other settings stay
        backbone['attention'] = 'sdpa'
    backbone['preset'] = MINI_PRESETS.get(backbone.get('preset'), backbone.get('preset'))


def full_then_tiny(name: str, demo_photos: Path, tiny_vae: Path, latents) -> dict:
    """Validate the recipe as written (schema, precision, FSDP block), then shrink only its sizes."""
    full = load_config(REPO / 'yamls' / name)
    fsdp_config(full)  # composer's FSDPConfig accepts the block (it can only run on CUDA)
    from composer.core import Precision
    Precision(full.precision)
    if isinstance(full.device_train_microbatch_size, int):
        assert full.global_train_batch_size % full.device_train_microbatch_size == 0
    raw = OmegaConf.to_container(load_yaml(REPO / 'yamls' / name), resolve=False)
    raw.update(precision='fp32', fsdp_config=None, device_train_microbatch_size=None, load_path=None)
    model = raw['model']
    _shrink_model(model, tiny_vae)
    data = demo_photos
    if raw['train_loader'].get('use_latents') not in (None, False):
        data = latents(model.get('text_encoder') or {'name': 'minilm'})
        if 'empty_caption_path' in model:
            model['empty_caption_path'] = str(data / 'empty_caption.safetensors')
    for key in ('train_loader', 'eval_loader'):
        if raw.get(key):
            _shrink_loader(raw[key], data)
    return raw


@pytest.mark.parametrize('name', YAMLS)
def test_every_recipe_builds_at_tiny_size_in_its_own_mode(name, demo_photos, tiny_vae, latents):
    raw = full_then_tiny(name, demo_photos, tiny_vae, latents)
    cfg = load_config(base=raw)
    parts = build_components(cfg, 2)
    batch = next(iter(parts['train_dataloader'].dataloader))
    if cfg.train_loader.get('use_latents'):
        assert 'latents' in batch and 'image' not in batch, 'a latent recipe must train on precomputed latents'
    model = parts['model']
    loss = model.loss(model(batch), batch)
    if isinstance(loss, dict):  # composer accepts a dict of losses with a 'total'
        loss = loss['total']
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_recipe_folders_are_found():
    assert 'commoncanvas/s-c-256.yaml' in YAMLS and 'commoncanvas/s-c-512.yaml' in YAMLS
    assert not any(n.startswith(NOT_TRAIN_CONFIGS) for n in YAMLS)


def test_stage_two_inherits_stage_one_and_changes_what_it_says():
    one = load_config(REPO / 'yamls/commoncanvas/s-c-256.yaml')
    two = load_config(REPO / 'yamls/commoncanvas/s-c-512.yaml')
    nc = load_config(REPO / 'yamls/commoncanvas/s-nc-512.yaml')
    assert two.train_loader['resolution'] == 512 and two.load_weights_only and two.max_duration == '850000ba'
    assert two.load_path == 'outputs/commoncanvas-s-c-256/checkpoints/latest-rank0.pt'
    assert two.algorithms['ema']['ema_start'] == '800000ba'  # the last 50k of 850k (~3.5 % of 1.4M steps)
    assert set(one.algorithms) < set(two.algorithms)
    assert two.model == one.model and two.optimizer == one.optimizer
    assert 'commoncatalog-nc' in nc.train_loader['remote'] and 's-nc-256' in nc.load_path


# The full-scale recipes (GPU clusters): every training recipe outside the CPU demos.
FULL = [n for n in YAMLS if n.startswith(('commoncanvas/', 'microdit/')) and 'mini-cpu' not in n] + \
    ['sd2-base-cc.yaml']


def test_design_card_command_trains_commoncanvas_s():
    """`composer run.py yamls/sd2-base-cc.yaml` (finding 10): the canonical CommonCanvas-S-C 256 px recipe, which
    yamls/commoncanvas/s-c-256.yaml is (base:), and stage 2 and the NC recipes build on."""
    import dataclasses
    canonical = load_config(REPO / 'yamls/sd2-base-cc.yaml')
    assert dataclasses.asdict(canonical) == dataclasses.asdict(load_config(REPO / 'yamls/commoncanvas/s-c-256.yaml'))
    assert canonical.model['backbone']['preset'] == 'sd2-base' and canonical.train_loader['resolution'] == 256
    assert canonical.max_duration == '550000ba' and canonical.global_train_batch_size == 2048
    assert canonical.train_loader['remote'].endswith('commoncatalog-c/latents')


@pytest.mark.parametrize('name', FULL)
def test_full_recipes_are_set_for_gpu_clusters(name):
    """Findings 6-9 as the recipes state them: pinned host memory; a streaming cache with a limit, outside /tmp,
    and a fixed canonical node count; sample grids at the training resolution; MicroDiT compiled as its public
    run; the L recipe on SHARD_GRAD_OP without activation checkpointing, as SDXL-base-256."""
    cfg = load_config(REPO / 'yamls' / name)
    loader = cfg.train_loader
    assert loader.get('pin_memory') is True
    assert loader.get('cache_limit') and loader.get('num_canonical_nodes')
    assert not str(loader['local']).startswith('/tmp')
    resolution = loader['resolution']
    sample = cfg.callbacks.get('sample_images')
    if sample is not None:
        assert sample['height'] == sample['width'] == resolution
    if cfg.model['name'] == 'latent_diffusion' and cfg.model['backbone']['name'] == 'microdit':
        assert 'compile_backbone' in cfg.algorithms
    if cfg.fsdp_config is not None:
        assert cfg.fsdp_config['sharding_strategy'] == 'SHARD_GRAD_OP'
        assert not cfg.fsdp_config.get('activation_checkpointing')
    assert cfg.optimizer['name'] == 'adamw' and cfg.optimizer.get('fused') is True


def test_platform_run_yaml_asks_for_the_documented_gpu_type():
    """Finding 9: the MosaicML run YAML asked for A100s; its GPU type is a documented parameter, H100 by default,
    and it trains the canonical recipe."""
    import yaml
    text = (REPO / 'scripts/launch/mosaicml.yaml').read_text()
    run = yaml.safe_load(text)
    assert run['compute']['gpu_type'] == 'h100_80gb' and 'compute.gpu_type' in text and '--gpu-type' in text
    assert 'yamls/sd2-base-cc.yaml' in run['command']
