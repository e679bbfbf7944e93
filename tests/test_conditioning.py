"""Disentangled control conditioning and resolution transfer (diffusion/models/conditioning.py and its users):
the noise-level gate, control dropout's null control, two-scale guidance, noisy replicate padding, the dataset's
flip-mirrored crop offset and control dropout, position-table resampling and the resolution-shifted schedule."""
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffusion.config import load_config
from diffusion.data.dataset import StreamingImageCaptionDataset, _resize_crop
from diffusion.models.conditioning import (adapt_position_entries, control_gate, generation_controls,
                                           noisy_replicate_padding, resample_position_table)
from diffusion.models.latent_diffusion import build_latent_diffusion
from diffusion.models.unet import build_unet
from diffusion.samplers import compositional_guidance
from diffusion.schedules import DDPMSchedule, EDMSchedule, snr
from diffusion.training.train import build_trainer

SCHEDULES = {'ddpm': {'name': 'ddpm', 'prediction_type': 'v_prediction'}, 'edm': {'name': 'edm'}}


def tiny_model(conditioning='disentangled', schedule='ddpm', **kwargs):
    torch.manual_seed(0)
    backbone = {'name': 'unet', 'preset': 'mini-s', 'sample_size': 8, 'conditioning': conditioning}
    backbone.update(kwargs.pop('backbone', {}))
    return build_latent_diffusion(autoencoder={'name': 'autoencoder_kl', 'config': 'tiny'},
                                  text_encoder={'name': 'minilm'}, backbone=backbone,
                                  noise_schedule=SCHEDULES[schedule], **kwargs).eval()


@pytest.fixture(scope='module')
def disentangled():
    model = tiny_model()
    with torch.no_grad():  # a trained-looking null control, so that using it is visible
        for p in model.backbone.control_embedding.null.values():
            p.normal_()
    return model


def _batch(n=2, crop=(0, 0), target=(32, 32), dropped=False):
    return {'original_size': torch.tensor([[48, 40]] * n), 'crop_top_left': torch.tensor([list(crop)] * n),
            'target_size': torch.tensor([list(target)] * n), 'flip': torch.zeros(n, dtype=torch.long),
            'control_dropped': torch.tensor([dropped] * n)}


def _predict(model, t, batch, x=None):
    """Backbone output at schedule time ``t`` (DDPM step or EDM sigma) for fixed latents and captions."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g) if x is None else x
    cond = model._backbone_kwargs(model.encode_text(['a red apple', 'a dog']), batch)
    with torch.no_grad():
        return model.denoise(x, torch.full((2,), t), cond)


# ---------------------------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------------------------
def test_gate_is_zero_at_pure_noise_and_one_at_no_noise():
    u = torch.tensor([1.0, 0.0, 0.5, 0.75])
    gate = control_gate(u)
    assert gate[0] == 0.0 and gate[1] == 1.0  # exact, not 1e-15
    torch.testing.assert_close(gate[2], torch.tensor(0.5))  # cos^2(pi/4)
    assert control_gate(u, u_end=0.5)[2:].eq(0).all()  # a shorter gate is already closed at u = 0.5
    ddpm, edm = DDPMSchedule(), EDMSchedule()
    assert ddpm.noise_level(torch.tensor([999, 0])).tolist() == [1.0, 0.0]
    c_noise = torch.tensor([math.log(edm.sigma_max), math.log(edm.sigma_min)]) / 4  # what the network receives
    torch.testing.assert_close(edm.noise_level(c_noise), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize('schedule', ['ddpm', 'edm'])
def test_controls_do_not_move_the_prediction_at_pure_noise_but_do_at_low_noise(schedule):
    model = tiny_model(schedule=schedule)
    noisy, clean = (999, 0) if schedule == 'ddpm' else (200.0, 0.002)  # EDM: sigma >= sigma_max is pure noise
    a, b = _batch(crop=(0, 0), target=(32, 32)), _batch(crop=(10, 6), target=(64, 48))
    assert torch.equal(_predict(model, noisy, a), _predict(model, noisy, b))
    assert (_predict(model, clean, a) - _predict(model, clean, b)).abs().max() > 1e-4


def test_summed_sdxl_baseline_lets_controls_act_at_pure_noise():
    model = tiny_model(conditioning='sdxl_summed', use_time_ids=True)
    assert model.backbone.unet.config.addition_embed_type == 'text_time'
    a, b = _batch(crop=(0, 0), target=(32, 32)), _batch(crop=(10, 6), target=(64, 48))
    assert (_predict(model, 999, a) - _predict(model, 999, b)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Control dropout and guidance
# ---------------------------------------------------------------------------------------------------------------
def test_control_dropout_uses_the_null_control(disentangled):
    model = disentangled
    a = _batch(crop=(0, 0), target=(32, 32), dropped=True)
    b = _batch(crop=(10, 6), target=(64, 48), dropped=True)
    dropped_a = _predict(model, 300, a)
    assert torch.equal(dropped_a, _predict(model, 300, b))  # the controls no longer matter
    assert (dropped_a - _predict(model, 300, {**a, 'control_dropped': torch.tensor([False, False])})).abs().max() > 1e-4
    # ... and what replaces them is the learned null embedding: zero it and the prediction changes.
    emb = model.backbone.control_embedding
    controls = generation_controls(2, 32, 32)
    level = torch.full((2,), 0.3)
    out = emb(controls, level, torch.tensor([True, False]))
    expected = sum(control_gate(level[:1], emb.gate_end[g]) * emb.null[g] for g in emb.null)
    torch.testing.assert_close(out[0], expected)


def test_compositional_guidance_with_unit_scales_is_the_conditional_prediction():
    g = torch.Generator().manual_seed(0)
    e00, es0, esc = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(compositional_guidance(e00, es0, esc, 1.0, 1.0), esc)
    # w_c = 0 leaves only text guidance from the null-control branches
    torch.testing.assert_close(compositional_guidance(e00, es0, esc, 3.0, 0.0), e00 + 3.0 * (es0 - e00))


def test_generate_three_branches_at_unit_scales_equals_conditional(disentangled):
    kw = dict(num_inference_steps=3, seed=[1, 2], output_type='latent')
    plain = disentangled.generate(['a cat', 'a house'], guidance_scale=1.0, **kw)
    three = disentangled.generate(['a cat', 'a house'], guidance_scale=1.0, control_guidance_scale=1.0, **kw)
    torch.testing.assert_close(three, plain, rtol=1e-4, atol=1e-5)
    other = disentangled.generate(['a cat', 'a house'], guidance_scale=1.0, control_guidance_scale=4.0, **kw)
    assert (other - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match='disentangled'):
        tiny_model(conditioning='none').generate(['a cat'], control_guidance_scale=2.0, num_inference_steps=1,
                                                 output_type='latent')


def test_pooled_text_only_with_keep_pooled_text():
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    text = torch.randn(1, 5, 384)
    kwargs = dict(controls=generation_controls(1, 32, 32), noise_level=torch.tensor([0.2]))
    for keep in (False, True):
        torch.manual_seed(0)
        net = build_unet('mini-s', sample_size=8, cross_attention_dim=384, conditioning='disentangled',
                         keep_pooled_text=keep, pooled_text_dim=384)
        assert net.unet.config.addition_embed_type is None and net.unet.config.class_embed_type == 'identity'
        with torch.no_grad():
            outs = [net(x, t, text_hidden=text, text_pooled=torch.randn(1, 384), **kwargs) for _ in range(2)]
        assert torch.equal(outs[0], outs[1]) != keep


# ---------------------------------------------------------------------------------------------------------------
# Text padding
# ---------------------------------------------------------------------------------------------------------------
def test_noisy_replicate_padding_copies_real_tokens_cyclically():
    hidden = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    out = noisy_replicate_padding(hidden, mask)
    assert out[0, :, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert out[1, :, 0].tolist() == [6, 7, 8, 9, 10, 6]
    noisy = noisy_replicate_padding(hidden, mask, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[0, :2], hidden[0, :2]) and not torch.equal(noisy[0, 2:], out[0, 2:])
    with pytest.raises(ValueError, match='right-padded'):
        noisy_replicate_padding(hidden, mask.flip(1))


def test_model_pads_text_at_load_time_not_in_the_stored_states():
    model = tiny_model(conditioning='none', text_padding='noisy_replicate', text_padding_noise=0.1)
    text = model.encode_text(['a dog'])
    stored = {k: v.clone() for k, v in text.items()}
    batch = {'latents': torch.zeros(1, 4, 8, 8), 'caption_dropped': torch.tensor([False]), **text}
    cond = model.batch_conditioning(batch)
    assert torch.equal(batch['text_hidden'], stored['text_hidden'])  # the batch (shard) is untouched
    n = int(text['text_mask'].sum())
    torch.testing.assert_close(cond['text_hidden'][0, n:2 * n], text['text_hidden'][0, :n])  # eval: no noise


# ---------------------------------------------------------------------------------------------------------------
# Data: flip mirrors the crop offset, control dropout is its own flag
# ---------------------------------------------------------------------------------------------------------------
def test_flip_reports_the_crop_offset_in_the_mirrored_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8))
    crop, top, left = _resize_crop(image, (32, 32), (0.3, 0.2))
    crop_f, top_f, left_f = _resize_crop(image, (32, 32), (0.3, 0.2), flip=True)
    new_w = round(70 * 32 / 40)
    assert (top_f, left_f) == (top, new_w - 32 - left) and left_f != left
    # SDXL's order: flip the resized image, then crop at the reported offset -> the mirrored crop.
    resized = image.resize((new_w, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)
    flipped_then_cropped = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((left_f, top_f, left_f + 32,
                                                                                      top_f + 32))
    assert np.array_equal(np.asarray(flipped_then_cropped), np.asarray(crop_f)[:, ::-1])


def test_dataset_flags_control_dropout_independently(demo_photos):
    def flags(p):
        ds = StreamingImageCaptionDataset(local=str(demo_photos), split='train', resolution=32, crop='random',
                                          random_flip=True, control_dropout=p, shuffle=False, batch_size=4)
        return [ds[i] for i in range(len(ds))]
    half, none = flags(0.5), flags(0.0)
    dropped = [bool(s['control_dropped']) for s in half]
    assert any(dropped) and not all(dropped) and not any('control_dropped' in s for s in none)
    # Drawn last: the other random choices of each sample are the same with and without control dropout.
    assert all(torch.equal(a['crop_top_left'], b['crop_top_left']) and a['flip'] == b['flip']
               for a, b in zip(half, none))


# ---------------------------------------------------------------------------------------------------------------
# Resolution transfer
# ---------------------------------------------------------------------------------------------------------------
def test_resampled_position_table_interpolates_the_old_grid():
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing='ij')
    table = torch.stack([ys, xs], -1).reshape(1, 16, 2)  # a table linear in the coordinates
    same = resample_position_table(table, (4, 4))
    torch.testing.assert_close(same, table)
    big = resample_position_table(table, (8, 8), mode='bilinear').reshape(8, 8, 2)
    # half-pixel-centred bilinear: new cell i sits at old coordinate (i + 0.5) / 2 - 0.5
    centres = (torch.arange(8.0) + 0.5) / 2 - 0.5
    torch.testing.assert_close(big[2:6, 3, 0], centres[2:6])
    torch.testing.assert_close(big[4, 2:6, 1], centres[2:6])


def test_position_entries_adapt_to_the_new_grid():
    class Net(torch.nn.Module):
        def __init__(self, side):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.randn(1, side * side, 3))
            self.register_buffer('fixed_pos_embed', torch.full((side * side, 3), float(side)))

    old, new = Net(4), Net(8)
    state = {f'backbone.{k}': v for k, v in old.state_dict().items()}
    changes = adapt_position_entries(new, state, 'backbone.')
    assert len(changes) == 2
    torch.testing.assert_close(state['backbone.pos_embed'], resample_position_table(old.pos_embed, (8, 8)))
    assert torch.equal(state['backbone.fixed_pos_embed'], new.fixed_pos_embed)  # the rebuilt one is kept


@pytest.mark.parametrize('schedule', ['ddpm', 'edm'])
def test_loading_a_lower_resolution_checkpoint_shifts_the_schedule(schedule, caplog):
    low = tiny_model(schedule=schedule, resolution=32)
    high = tiny_model(schedule=schedule, resolution=64)
    base_snr = snr(high.noise_schedule.alphas_cumprod.double()) if schedule == 'ddpm' else None
    with caplog.at_level(logging.INFO, logger='diffusion.models.latent_diffusion'):
        high.load_state_dict(low.state_dict())
    assert 'checkpoint trained at 32 px (schedule base 32 px), model at 64 px' in caplog.text
    assert high.resolution_record.tolist() == [32, 64]
    if schedule == 'ddpm':  # SNR / shift^2 at every step
        # alphas_cumprod is stored in float32: near t = 0 (1 - a ~ 1e-3) the SNR carries ~1e-4 relative rounding
        torch.testing.assert_close(snr(high.noise_schedule.alphas_cumprod.double()), base_snr / 4, rtol=2e-4, atol=0)
    else:
        assert high.noise_schedule.p_mean == pytest.approx(low.noise_schedule.p_mean + math.log(2))
    # Resuming the transferred checkpoint keeps the base: still shifted by 2.
    again = tiny_model(schedule=schedule, resolution=64)
    again.load_state_dict(high.state_dict())
    assert again.noise_schedule.resolution_shift == 2.0


def test_transfer_through_a_trainer_checkpoint(demo_photos, tmp_path, repo):
    base = OmegaConf.to_container(OmegaConf.load(repo / 'yamls/tiny-cpu.yaml'))
    base['callbacks'] = {}  # no sample grids: this test is about the checkpoint hand-over

    def cfg(resolution, out, **extra):
        over = {'variables.data': str(demo_photos), 'variables.resolution': str(resolution),
                'model.backbone.sample_size': str(resolution // 4), 'model.backbone.conditioning': 'disentangled',
                'model.resolution': str(resolution), 'train_loader.control_dropout': '0.5',
                'save_folder': str(out), 'max_duration': '2ba', 'eval_first': 'false', 'eval_interval': '100ba',
                'save_interval': '2ba', 'global_train_batch_size': '4', **extra}
        return load_config(base=base, overrides=[f'{k}={v}' for k, v in over.items()])

    low = build_trainer(cfg(32, tmp_path / 'low'))
    low.fit()
    assert torch.isfinite(low.state.loss).all()
    high = build_trainer(cfg(64, tmp_path / 'high', load_path=str(tmp_path / 'low' / 'latest-rank0.pt'),
                             load_weights_only='true', max_duration='1ba'))
    model = high.state.model
    assert model.resolution_record.tolist() == [32, 64] and model.noise_schedule.resolution_shift == 2.0
    high.fit()
    assert torch.isfinite(high.state.loss).all()


def test_generation_cli_passes_control_guidance_and_metadata(disentangled, tmp_path):
    from diffusion.evaluation.generate import generate_to_folder
    settings = {'seed': 0, 'guidance_scale': 2.0, 'num_inference_steps': 2, 'sampler': 'ddim', 'height': 32,
                'width': 32, 'guidance_rescale': 0.0, 'negative_prompt': None}
    runs = {'plain': {}, 'control': {'control_guidance_scale': 3.0},
            'meta': {'micro_conditioning': {'target_size': [64, 64], 'crop_top_left': [8, 8]}}}
    images = {}
    for name, extra in runs.items():
        entries = generate_to_folder(disentangled, ['a cat'], tmp_path / name, {**settings, **extra}, progress=False)
        assert entries[0]['control_guidance_scale'] == extra.get('control_guidance_scale')
        images[name] = np.asarray(Image.open(tmp_path / name / entries[0]['file']), dtype=np.int16)
    assert np.abs(images['control'] - images['plain']).max() > 0
    assert np.abs(images['meta'] - images['plain']).max() > 0


def test_unknown_conditioning_form_is_named():
    with pytest.raises(ValueError, match="unknown UNet conditioning 'summed'"):
        build_unet('mini-s', conditioning='summed')
    with pytest.raises(ValueError, match='keep_pooled_text'):
        build_unet('mini-s', conditioning='none', keep_pooled_text=True)


# ---------------------------------------------------------------------------------------------------------------
# The transformer: control in the adaLN input, sin-cos table rebuilt on transfer
# ---------------------------------------------------------------------------------------------------------------
def tiny_dit(conditioning='disentangled', sample_size=8, **kwargs):
    torch.manual_seed(0)
    model = tiny_model(backbone={'name': 'microdit', 'preset': 'microdit-mini', 'sample_size': sample_size,
                                 'dim': 64, 'depth': 2, 'patch_mixer_depth': 1, 'patch_mixer_dim': 64,
                                 'conditioning': conditioning}, schedule='edm', **kwargs)
    with torch.no_grad():  # the public init zeroes adaLN outputs (identity blocks, zero output): randomise them
        for name, p in model.backbone.named_parameters():
            if 'adaLN' in name or 'final_linear' in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize('conditioning', ['disentangled', 'sdxl_summed'])
def test_microdit_controls_enter_adaln_gated_only_when_disentangled(conditioning):
    model = tiny_dit(conditioning)
    a, b = _batch(crop=(0, 0), target=(32, 32)), _batch(crop=(10, 6), target=(64, 48))
    same_at_pure_noise = torch.equal(_predict(model, 200.0, a), _predict(model, 200.0, b))
    assert same_at_pure_noise == (conditioning == 'disentangled')
    assert (_predict(model, 0.002, a) - _predict(model, 0.002, b)).abs().max() > 1e-5
    assert (model.backbone.pooled_y_emb_process is None) == (conditioning == 'disentangled')


def test_microdit_sincos_table_at_the_new_size_interpolates_the_old_grid(caplog):
    low, high = tiny_dit(sample_size=8, resolution=32), tiny_dit(sample_size=16, resolution=64)
    with caplog.at_level(logging.INFO, logger='diffusion.models.latent_diffusion'):
        high.load_state_dict(low.state_dict())
    assert 'position interpolation scale 2' in caplog.text
    assert high.backbone.config.pos_interp_scale == 2.0 and high.noise_schedule.resolution_shift == 2.0
    old = low.backbone.pos_embed.reshape(4, 4, -1)  # grid 4 (8 latents, patch 2): positions 0, 1, 2, 3
    new = high.backbone.pos_embed.reshape(8, 8, -1)  # grid 8 at scale 2: positions 0, 0.5, ..., 3.5
    assert torch.equal(new[::2, ::2], old)  # the old grid's positions, exactly
    assert not torch.equal(new[1::2, 1::2], old)  # and the half positions between them


# ---------------------------------------------------------------------------------------------------------------
# The eval sweep: a (text, control) guidance grid through run_eval's code path
# ---------------------------------------------------------------------------------------------------------------
def test_eval_sweep_runs_a_control_guidance_grid(demo_photos, tmp_path, repo):
    import json

    from diffusion.evaluation.evaluate import EvalConfig, evaluate
    base = OmegaConf.to_container(OmegaConf.load(repo / 'yamls/tiny-cpu.yaml'))
    base['callbacks'], base['eval_loader'] = {}, None
    over = {'variables.data': str(demo_photos), 'variables.resolution': '32', 'model.backbone.sample_size': '8',
            'model.backbone.conditioning': 'disentangled', 'train_loader.control_dropout': '0.5',
            'save_folder': str(tmp_path / 'run'), 'max_duration': '2ba', 'save_interval': '2ba',
            'global_train_batch_size': '4', 'log_to_console': 'false'}
    trainer = build_trainer(load_config(base=base, overrides=[f'{k}={v}' for k, v in over.items()]))
    trainer.fit()
    trainer.close()
    out = tmp_path / 'eval'
    grid = dict(guidance_scales=[1.0, 3.0], control_guidance_scales=[1.0, 4.0])
    cfg = load_config(repo / 'yamls/eval/tiny-cpu.yaml',
                      [f'checkpoint={tmp_path / "run"}', f'reference={demo_photos}', f'out_dir={out}', 'num_images=3',
                       f'guidance_scales={grid["guidance_scales"]}',
                       f'control_guidance_scales={grid["control_guidance_scales"]}', 'num_inference_steps=2',
                       'sampler=ddim', 'height=32', 'width=32', 'kid_subsets=5', 'batch_size=3'], schema=EvalConfig)
    results = evaluate(cfg)
    saved = json.loads((out / 'results.json').read_text())
    cells = [(g, c) for g in grid['guidance_scales'] for c in grid['control_guidance_scales']]
    assert [(r['guidance_scale'], r['control_guidance_scale']) for r in saved['results']] == cells
    pixels = {}
    for row, (g, c) in zip(saved['results'], cells):
        folder = Path(row['images'])
        assert folder.name == f'g{g:g}_c{c:g}' and row['num_generated'] == 3 and np.isfinite(row['fid'])
        entries = [json.loads(x) for x in (folder / 'manifest.jsonl').read_text().splitlines()]
        assert [(e['guidance_scale'], e['control_guidance_scale']) for e in entries] == [(g, c)] * 3
        pixels[g, c] = np.stack([np.asarray(Image.open(folder / e['file']), dtype=np.int16) for e in entries])
    # The control scale acts at either text scale ...
    assert np.abs(pixels[1.0, 4.0] - pixels[1.0, 1.0]).max() > 0
    assert np.abs(pixels[3.0, 4.0] - pixels[3.0, 1.0]).max() > 0
    # ... and the (1, 1) cell is the plain conditional prediction: the same images as generate() without guidance
    # (three branches vs one, equal up to float rounding: at most one grey level in the PNGs).
    model = trainer.state.model.eval()
    captions = [e['prompt'] for e in entries]
    plain = model.generate(captions, height=32, width=32, num_inference_steps=2, sampler='ddim',
                           guidance_scale=1.0, seed=[0, 1, 2], output_type='pil')
    assert np.abs(np.stack([np.asarray(im, dtype=np.int16) for im in plain]) - pixels[1.0, 1.0]).max() <= 1
    with Image.open(results['plot']) as im:
        assert im.size[0] > 100
