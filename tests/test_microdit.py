"""MicroDiT: exact preset sizes and widths, deferred masking, expert-choice MoE, the kept-patch loss, the MoE
learning-rate groups, and a short real ``Trainer.fit`` of the mini preset (with the mask schedule and EMA)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion.models.latent_diffusion import LatentDiffusion
from diffusion.models.layers import sincos_pos_embed_2d
from diffusion.models.microdit import (DiTBlock, ExpertChoiceMoE, block_widths, build_microdit, keep_tokens,
                                       microdit_config, mixer_widths, random_token_mask, restore_tokens)
from diffusion.schedules import EDMSchedule

REPO = Path(__file__).resolve().parents[1]

# MicroDiT_XL_2 per block, read from the public code by instantiation (qkv width, heads, MoE, FFN hidden, params).
XL_BLOCKS = [
    (512, 8, False, 512, 14164992), (640, 10, True, 768, 25707520), (640, 10, False, 768, 15475712),
    (640, 10, True, 1024, 29901824), (640, 10, False, 768, 15475712), (640, 10, True, 1280, 34096128),
    (640, 10, False, 1024, 16262144), (768, 12, True, 1536, 38814720), (768, 12, False, 1280, 17572864),
    (768, 12, True, 1792, 43009024), (768, 12, False, 1280, 17572864), (768, 12, True, 2048, 47203328),
    (768, 12, False, 1536, 18359296), (768, 12, True, 2304, 51397632), (896, 14, False, 1792, 19670016),
    (896, 14, True, 2560, 56116224), (896, 14, False, 1792, 19670016), (896, 14, True, 2816, 60310528),
    (896, 14, False, 2048, 20456448), (896, 14, True, 3072, 64504832), (896, 14, False, 2304, 21242880),
    (1024, 16, True, 3328, 69223424), (1024, 16, False, 2304, 21767168), (1024, 16, True, 3584, 73417728),
    (1024, 16, False, 2560, 22553600), (1024, 16, True, 3840, 77612032), (1024, 16, False, 2816, 23340032),
    (1024, 16, False, 2816, 23340032),
]
XL_MIXER = [(768, 12, i % 2 == 1, 3072 if i % 2 else 2048, 47198976 if i % 2 else 14162688) for i in range(6)]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope='module')
def xl():
    return build_microdit('microdit-xl-2', device='meta')


@pytest.mark.parametrize('preset,expected', [('microdit-xl-2', 1_165_442_320), ('microdit-tiny-2', 200_692_752)])
def test_preset_parameter_counts_exact(preset, expected):
    assert n_params(build_microdit(preset, device='meta')) == expected


def test_xl_layerwise_widths_match_public_code(xl):
    for block, widths, row in zip(xl.blocks, block_widths(xl.config), XL_BLOCKS, strict=True):
        qkv, heads, moe, ffn, params = row
        assert (widths['qkv'], widths['heads'], widths['moe'], widths['ffn']) == (qkv, heads, moe, ffn)
        assert (block.attn.hidden, block.attn.heads) == (qkv, heads)
        assert isinstance(block.mlp, ExpertChoiceMoE) == moe and block.mlp.hidden == ffn
        assert block.cross_attn.hidden == 1024  # cross-attention is never scaled
        assert n_params(block) == params
    for block, widths, row in zip(xl.patch_mixer, mixer_widths(xl.config), XL_MIXER, strict=True):
        assert (widths['qkv'], widths['heads'], widths['moe'], widths['ffn'], n_params(block)) == row
    assert sum(isinstance(m, ExpertChoiceMoE) for m in xl.modules()) == 16  # 13 backbone + 3 mixer


def test_tiny_moe_placement():
    cfg = microdit_config('microdit-tiny-2')
    assert [i for i, w in enumerate(block_widths(cfg)) if w['moe']] == [1, 3, 5, 7, 9, 11, 13]
    assert [i for i, w in enumerate(mixer_widths(cfg)) if w['moe']] == [1, 3]


def test_position_embedding_interpolation():
    base = sincos_pos_embed_2d(64, 16, 16, base_size=16)  # 256 px: positions 0..15
    fine = sincos_pos_embed_2d(64, 32, 32, base_size=32, interp_scale=2.0)  # 512 px: 0, 0.5, ..., 15.5
    torch.testing.assert_close(fine.view(32, 32, 64)[::2, ::2], base.view(16, 16, 64), rtol=0, atol=1e-6)
    assert not torch.allclose(fine.view(32, 32, 64)[1::2, 1::2], base.view(16, 16, 64))


# --------------------------------------------------------------------------------------------- masking


def test_mask_then_restore_keeps_tokens_in_place():
    n, t, d = 3, 64, 5
    x = torch.randn(n, t, d)
    ids_keep, ids_restore, mask = random_token_mask(n, t, 0.75)
    assert ids_keep.shape == (n, 16) and ids_restore.shape == (n, t) and mask.shape == (n, t)
    assert (mask.sum(1) == t - 16).all()
    kept = keep_tokens(x, ids_keep)  # (n, 16, d)
    back = restore_tokens(kept, ids_restore)  # (n, t, d)
    assert back.shape == x.shape
    keep = mask == 0
    torch.testing.assert_close(back[keep], x[keep], rtol=0, atol=0)
    assert (back[~keep] == 0).all()
    for i in range(n):  # the kept set is exactly ids_keep, and differs between samples
        assert set(torch.nonzero(keep[i]).flatten().tolist()) == set(ids_keep[i].tolist())
    assert any(set(ids_keep[0].tolist()) != set(ids_keep[i].tolist()) for i in range(1, n))


# The mini structure (mixer with MoE, layer-wise scaling, 8 experts) at an even smaller width, for speed.
SMALL = dict(dim=64, head_dim=16, multiple_of=32, patch_mixer_dim=32, sample_size=8, cross_attention_dim=32)


def _mini(**overrides):
    torch.manual_seed(0)
    model = build_microdit('microdit-mini', **{**SMALL, **overrides})
    with torch.no_grad():  # the zero-initialised output layers would make every comparison trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(n=2, size=8, length=7, width=32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, size, size, generator=g), torch.randn(n, generator=g),
            {'text_hidden': torch.randn(n, length, width, generator=g)})


@pytest.mark.parametrize('mixer', [True, False])
def test_mask_ratio_zero_is_the_unmasked_model_exactly(mixer):
    model = _mini(use_patch_mixer=mixer)
    x, t, cond = _inputs()
    model.eval()
    plain = model(x, t, **cond)
    model.train()
    out, mask = model(x, t, **cond, return_mask=True)
    assert mask is None
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


@pytest.mark.parametrize('mixer', [True, False])
def test_masked_forward_zeros_removed_patches(mixer):
    model = _mini(use_patch_mixer=mixer, mask_ratio=0.75).train()
    x, t, cond = _inputs()
    out, mask = model(x, t, **cond, return_mask=True)
    assert out.shape == x.shape and mask.shape == (2, 8, 8)
    removed = mask.bool().unsqueeze(1).expand_as(out)
    assert (out[removed] == 0).all() and (out[~removed] != 0).all()
    assert (mask.sum(dim=(1, 2)) == 4 * (16 - int(16 * 0.25))).all()  # 16 patches of 2x2, 4 kept
    torch.testing.assert_close(model(x, t, **cond), model.eval()(x, t, **cond), rtol=0, atol=0)  # no mask asked


def test_expert_choice_takes_exact_capacity_and_matches_dense_reference():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=16, hidden=32, num_experts=8, capacity=2.0)
    moe.init_weights(0.1)
    x = torch.randn(3, 64, 16)
    g, idx = moe.route(x)
    assert idx.shape == (3, 8, 16)  # k = int(2 * 64 / 8)
    for i in range(3):
        for e in range(8):
            assert len(set(idx[i, e].tolist())) == 16  # each expert takes exactly k distinct tokens
    # The public code's one-hot formulation, written out, gives the same output.
    p = F.one_hot(idx, num_classes=64).float()  # (n, e, k, t)
    h = F.gelu(torch.einsum('nekd,edf->nekf', torch.einsum('nekt,ntd->nekd', p, x), moe.w1))
    ref = torch.einsum('nekt,nekd->ntd', p, g.unsqueeze(-1) * torch.einsum('nekf,efd->nekd', h, moe.w2))
    torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-6)


def test_expert_choice_with_active_tokens_computes_only_them():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=16, hidden=32, num_experts=8, capacity=2.0)
    moe.init_weights(0.1)
    x = torch.randn(3, 64, 16, requires_grad=True)
    active = torch.rand(3, 64) < 0.25
    full, part = moe(x), moe(x, active)
    torch.testing.assert_close(part[active], full[active], rtol=1e-5, atol=1e-6)  # same routing, same outputs
    assert (part[~active] == 0).all()
    # Only the active tokens' outputs reach a loss: every gradient is the same as computing all pairs.
    grads = [torch.autograd.grad((out[active]**2).sum(), [x, moe.w1, moe.w2, moe.gate.weight]) for out in (full, part)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_last_mixer_block_skips_dropped_tokens_with_the_same_result():
    model = _mini(mask_ratio=0.75).train()
    x, t, cond = _inputs()
    results = []
    for skip in (True, False):
        model.skip_dropped_experts = skip
        model.zero_grad()
        torch.manual_seed(5)  # the same mask
        out, mask = model(x, t, **cond, return_mask=True)
        out.square().sum().backward()
        results.append((out, mask, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (out, mask, grads), (ref, ref_mask, ref_grads) = results
    torch.testing.assert_close(mask, ref_mask, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_masked_forward_compiles_as_one_graph():
    """Under torch.compile the skip is off (its padded width is data-dependent): fullgraph capture works and gives
    the eager result."""
    model = _mini(mask_ratio=0.75).train()
    x, t, cond = _inputs()
    torch.manual_seed(5)
    ref, mask = model(x, t, **cond, return_mask=True)
    model.compile(backend='eager', fullgraph=True)
    torch.manual_seed(5)
    out, mask2 = model(x, t, **cond, return_mask=True)
    torch.testing.assert_close(mask2, mask, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- training pieces


def _diffusion(**overrides) -> LatentDiffusion:
    sched = EDMSchedule(sigma_data=0.9, p_mean=-0.6, p_std=1.2)
    return LatentDiffusion(_mini(**overrides), sched, scaling_factor=1.0)


def test_loss_flows_only_through_kept_patches():
    model = _diffusion(mask_ratio=0.5).train()
    x, _, cond = _inputs(n=3)
    batch = {'latents': x, **cond}
    outputs = model(batch)
    assert len(outputs) == 4
    pred, target, weight, mask = outputs
    pred = pred.detach().requires_grad_(True)
    loss = model.loss((pred, target, weight, mask), batch)
    loss.backward()
    removed = mask.bool().unsqueeze(1).expand_as(pred)
    assert (pred.grad[removed] == 0).all() and (pred.grad[~removed] != 0).all()
    # The public code's per-patch mean over kept patches gives the same number.
    per_patch = F.avg_pool2d((weight.view(-1, 1, 1, 1) * (pred - target)**2).mean(1), 2).flatten(1)  # (B, T)
    keep = 1 - F.avg_pool2d(mask[:, None].float(), 2).flatten(1)
    torch.testing.assert_close(loss, ((per_patch * keep).sum(1) / keep.sum(1)).mean())
    # Changing the target where patches were removed changes nothing.
    target2 = torch.where(removed, target + 5, target)
    torch.testing.assert_close(model.loss((pred, target2, weight, mask), batch), loss, rtol=0, atol=0)
    # End to end the backbone gets gradients; evaluation never masks.
    model.zero_grad()
    model.loss(model(batch), batch).backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert len(model.eval().eval_forward(batch)) == 3  # composer evaluates in eval mode


def test_param_groups_hold_exactly_experts_and_routers_at_scaled_lr():
    from diffusion import registry
    model = _diffusion(moe_lr_scale=0.5)
    groups = model.param_groups({'name': 'decoupled_adamw', 'lr': 1e-3})
    expected = {id(m.w1) for m in model.modules() if isinstance(m, ExpertChoiceMoE)} | \
        {id(m.w2) for m in model.modules() if isinstance(m, ExpertChoiceMoE)} | \
        {id(m.gate.weight) for m in model.modules() if isinstance(m, ExpertChoiceMoE)}
    assert {id(p) for p in groups[1]['params']} == expected and len(expected) == 3 * 3  # 3 MoE layers
    assert {id(p) for p in groups[0]['params']} | expected == {id(p) for p in model.parameters()}
    opt = registry.build(registry.optimizers, {'name': 'decoupled_adamw', 'lr': 1e-3}, 'optimizer', params=groups)
    assert [g['lr'] for g in opt.param_groups] == [1e-3, 5e-4]
    plain = _diffusion()  # scale 1: one flat group of every trainable parameter
    assert {id(p) for p in plain.param_groups({'lr': 1e-3})} == {id(p) for p in plain.parameters()}


def test_composer_policies_select_blocks():
    model = _mini()
    assert model.fsdp_wrap_fn(model.blocks[0]) and model.activation_checkpointing_fn(model.patch_mixer[1])
    assert not model.fsdp_wrap_fn(model.x_embedder) and isinstance(model.blocks[-1], DiTBlock)


def test_mini_trains_with_mask_schedule_and_ema(demo_photos, tmp_path):
    from diffusion.config import load_config
    from diffusion.training.train import build_trainer
    over = {'variables.data': str(demo_photos), 'save_folder': str(tmp_path / 'ckpt'),
            'callbacks.sample_images.folder': str(tmp_path / 'samples'),
            'callbacks.sample_images.num_inference_steps': '1', 'max_duration': '4ba', 'eval_interval': '4ba',
            'save_interval': '4ba', 'algorithms.ema.ema_start': '2ba', 'eval_first': 'false',
            'global_train_batch_size': '4', 'device_eval_batch_size': '4',
            'algorithms.mask_schedule.schedule': '[[0ba, 0.75], [3ba, 0.0]]'}
    cfg = load_config(REPO / 'yamls/microdit/mini-cpu.yaml', [f'{k}={v}' for k, v in over.items()])
    trainer = build_trainer(cfg)
    model = trainer.state.model
    assert [g['initial_lr'] for g in trainer.state.optimizers[0].param_groups] == [1e-3, 5e-4]  # before warmup
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 4 and torch.isfinite(trainer.state.loss).all()
    assert model.backbone.mask_ratio == 0.0  # the schedule switched masking off at batch 3
    after = model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ema = [a for a in trainer.state.algorithms if type(a).__name__ == 'EMA']
    assert ema and ema[0].ema_started
    assert sorted((tmp_path / 'samples').glob('*.png'))
    assert np.isfinite(float(trainer.state.eval_metrics['eval']['ValidationLoss'].compute()))
    # The run's checkpoint exports natively (EMA weights) and generates.
    from diffusion.export.native import export_checkpoint_native, load_native
    folder = export_checkpoint_native(tmp_path / 'ckpt', tmp_path / 'export')
    config = __import__('json').loads((folder / 'config.json').read_text())
    assert config['metadata']['weights'] == 'ema' and config['generation']['sampler'] == 'heun'
    images = load_native(folder).generate(['a cat'], seed=[0], **{**config['generation'], 'num_inference_steps': 1})
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    # The settings a model was evaluated at become its folder's generation defaults (the demo's export).
    from diffusion.export.native import main as native_main
    assert native_main(['--checkpoint', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'export-euler'),
                        '--sampler', 'euler', '--guidance', '3']) == 0
    generation = __import__('json').loads((tmp_path / 'export-euler' / 'config.json').read_text())['generation']
    assert generation == {**config['generation'], 'sampler': 'euler', 'guidance_scale': 3.0}


def test_native_export_round_trip_generates_the_same_images(tmp_path):
    from diffusion import registry
    from diffusion.export.native import export_native, load_native
    block = {'name': 'latent_diffusion', 'autoencoder': {'name': 'autoencoder_kl', 'config': 'tiny'},
             'text_encoder': {'name': 'tiny_clip'},
             'backbone': {'name': 'microdit', 'preset': 'microdit-mini', **{k: v for k, v in SMALL.items()
                                                                           if k != 'cross_attention_dim'}},
             'noise_schedule': {'name': 'edm', 'sigma_data': 0.9, 'p_mean': -0.6, 'p_std': 1.2}}
    torch.manual_seed(0)
    model = registry.build(registry.models, block, 'model').eval()
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_native(model, block, tmp_path / 'export')
    loaded = load_native(tmp_path / 'export')
    assert type(loaded.backbone).__name__ == 'MicroDiT'
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    kwargs = dict(prompts=['a red bicycle', 'a lighthouse'], num_inference_steps=2, sampler='heun',
                  guidance_scale=5.0, seed=[1, 2], height=32, width=32)
    images = model.generate(**kwargs)
    assert images.shape == (2, 3, 32, 32) and images.std() > 0
    torch.testing.assert_close(loaded.generate(**kwargs), images, rtol=0, atol=0)


def test_mask_schedule_parsing():
    from diffusion.algorithms.mask_schedule import parse_schedule
    parsed = parse_schedule([['0ba', 0.75], ['0.7dur', 0.0]])  # units may mix; the given order is kept
    assert [(str(t), r) for t, r in parsed] == [(str(parsed[0][0]), 0.75), (str(parsed[1][0]), 0.0)]
    assert parsed[1][0].unit.value == 'dur'
    with pytest.raises(ValueError, match='chronological'):
        parse_schedule([['10ba', 0.5], ['5ba', 0.0]])
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        parse_schedule({'0ba': 1.0})


# --------------------------------------------------------------------------------------------- sampling defaults


def _tiny_model(schedule: dict) -> LatentDiffusion:
    from diffusion import registry
    block = {'name': 'latent_diffusion', 'autoencoder': {'name': 'autoencoder_kl', 'config': 'tiny'},
             'text_encoder': {'name': 'tiny_clip'},
             'backbone': {'name': 'microdit', 'preset': 'microdit-mini', **{k: v for k, v in SMALL.items()
                                                                           if k != 'cross_attention_dim'}},
             'noise_schedule': schedule}
    torch.manual_seed(0)
    return registry.build(registry.models, block, 'model').eval()


def _record_sampling(monkeypatch, model):
    """Record the sampler, step count and guidance scale that ``model.generate`` uses (no real sampling)."""
    import diffusion.models.generation as ld
    seen = {}
    real_make = model.noise_schedule.make_scheduler
    real_guidance = ld.guidance

    def make_scheduler(sampler):
        seen['sampler'] = sampler
        return real_make(sampler)

    def fake_sample(denoise_fn, scheduler, shape, *, num_steps, **kwargs):
        seen['num_inference_steps'] = num_steps
        denoise_fn(torch.zeros(shape), torch.ones(()))  # one guided call, so the guidance scale is recorded
        return torch.zeros(shape)

    def spy_guidance(uncond, cond, scale, rescale=0.0):
        seen['guidance_scale'] = scale
        return real_guidance(uncond, cond, scale, rescale)

    monkeypatch.setattr(model.noise_schedule, 'make_scheduler', make_scheduler)
    monkeypatch.setattr(ld, 'sample', fake_sample)
    monkeypatch.setattr(ld, 'guidance', spy_guidance)
    return seen


def test_sampling_defaults_follow_the_noise_schedule(monkeypatch, tmp_path):
    from diffusion import samplers
    from diffusion.evaluation import generate as gen
    from diffusion.schedules import DDPMSchedule
    assert samplers.sampling_defaults(EDMSchedule()) == {'sampler': 'heun', 'num_inference_steps': 30,
                                                    'guidance_scale': 5.0}
    assert samplers.sampling_defaults(DDPMSchedule()) == {'sampler': 'ddim', 'num_inference_steps': 50,
                                                     'guidance_scale': 7.5}
    assert samplers.resolve_sampling(EDMSchedule(), 'euler', None, 2.0) == {'sampler': 'euler',
                                                                       'num_inference_steps': 30,
                                                                       'guidance_scale': 2.0}
    # generate() with nothing given: an EDM model (MicroDiT) samples with Heun, 30 steps, guidance 5
    edm = _tiny_model({'name': 'edm', 'sigma_data': 0.9, 'p_mean': -0.6, 'p_std': 1.2})
    seen = _record_sampling(monkeypatch, edm)
    edm.generate(['a cat'], seed=[0], output_type='latent')
    assert seen == {'sampler': 'heun', 'num_inference_steps': 30, 'guidance_scale': 5.0}
    edm.generate(['a cat'], seed=[0], output_type='latent', sampler='euler', num_inference_steps=3,
                 guidance_scale=2.0)  # what the user gives wins
    assert seen == {'sampler': 'euler', 'num_inference_steps': 3, 'guidance_scale': 2.0}
    ddpm = _tiny_model({'name': 'ddpm'})
    seen = _record_sampling(monkeypatch, ddpm)
    ddpm.generate(['a cat'], seed=[0], output_type='latent')
    assert seen == {'sampler': 'ddim', 'num_inference_steps': 50, 'guidance_scale': 7.5}
    # the generation CLI (run_generate.py): unset keys take the loaded model's defaults, recorded in run.json
    from diffusion.checkpoints import CheckpointInfo
    monkeypatch.setattr('diffusion.checkpoints.load_model', lambda *a, **k: (
        edm, CheckpointInfo(checkpoint='ckpt.pt', config='config.yaml', weights='training', has_ema=False)))
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('a cat\n')
    (tmp_path / 'ckpt.pt').write_bytes(b'')  # generation checks the path exists before loading
    cfg = gen.GenerateConfig(checkpoint=str(tmp_path / 'ckpt.pt'), prompts=str(prompts), out_dir=str(tmp_path / 'out'),
                             contact_sheet=0, device='cpu')
    assert (cfg.sampler, cfg.num_inference_steps, cfg.guidance_scale) == (None, None, None)
    seen = _record_sampling(monkeypatch, edm)
    gen.run(cfg)
    recorded = __import__('json').loads((tmp_path / 'out' / 'run.json').read_text())
    assert {k: recorded[k] for k in seen} == {'sampler': 'heun', 'num_inference_steps': 30, 'guidance_scale': 5.0}
    assert seen == {'sampler': 'heun', 'num_inference_steps': 30, 'guidance_scale': 5.0}


# --------------------------------------------------------------------------------------------- stage chaining


def test_stages_chain_as_the_public_code(demo_photos, tmp_path):
    """Stage 2 (and 4) resume the previous stage's full state (AdamW moments, clock) under the new LR; stage 3
    loads weights only. Run at mini size with the load keys of the real stage-2 YAML."""
    from diffusion.config import load_config
    from diffusion.training.train import build_trainer
    stage2, stage3, stage4 = (load_config(REPO / f'yamls/microdit/{n}.yaml')
                              for n in ('256-unmasked', '512-masked', '512-unmasked'))
    assert not stage2.load_weights_only and not stage4.load_weights_only and stage3.load_weights_only
    assert (stage2.max_duration, stage3.max_duration, stage4.max_duration) == ('280000ba', '50000ba', '55000ba')
    assert 'microdit-xl-256-masked' in stage2.load_path and 'microdit-xl-512-masked' in stage4.load_path

    def trainer(lr, batches, **load):
        over = {'variables.data': str(demo_photos), 'save_folder': str(tmp_path / f'ckpt-{lr}'),
                'callbacks.sample_images.folder': str(tmp_path / 'samples'), 'max_duration': f'{batches}ba',
                'eval_interval': '100ba', 'save_interval': f'{batches}ba', 'eval_first': 'false',
                'global_train_batch_size': '2', 'device_eval_batch_size': '2', 'optimizer.lr': str(lr),
                'algorithms.mask_schedule.schedule': '[[0ba, 0.75]]', 'scheduler.t_warmup': '0ba', **load}
        cfg = load_config(REPO / 'yamls/microdit/mini-cpu.yaml', [f'{k}={v}' for k, v in over.items()])
        cfg.callbacks.pop('sample_images')
        return build_trainer(cfg)

    first = trainer(1e-3, 2)
    first.fit()
    moments = {id_: s['exp_avg'].clone() for id_, s in enumerate(first.state.optimizers[0].state.values())}
    ckpt = str(tmp_path / 'ckpt-0.001' / 'latest-rank0.pt')
    keys = '[' + ','.join(f'"{k}"' for k in stage2.load_ignore_keys) + ']'
    second = trainer(2e-4, 3, load_path=ckpt, load_weights_only='false', load_ignore_keys=keys)
    assert int(second.state.timestamp.batch) == 2  # the clock continues
    loaded = list(second.state.optimizers[0].state.values())
    assert loaded and all(torch.equal(s['exp_avg'], moments[i]) for i, s in enumerate(loaded))  # moments kept
    assert second.state.schedulers[0].base_lrs == [2e-4, 1e-4]  # the new LR (experts at half), not stage 1's
    second.fit()
    assert int(second.state.timestamp.batch) == 3
    assert [g['lr'] for g in second.state.optimizers[0].param_groups] == [2e-4, 1e-4]
    third = trainer(2e-4, 1, load_path=ckpt, load_weights_only='true')  # stage 3: weights only, fresh clock
    assert int(third.state.timestamp.batch) == 0 and not third.state.optimizers[0].state
