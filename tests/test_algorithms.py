"""Speed-up algorithms through real short ``Trainer.fit`` runs of the tiny config (channels-last, low-precision norms,
activation checkpointing, gradient accumulation, ``torch.compile`` of the backbone), the one-line-per-speed-up
report, and the FSDP wrapping / activation-checkpointing policy, checked on CPU without running FSDP."""
import logging
from pathlib import Path

import pytest
import torch
from composer.core import Callback

from diffusion.config import load_config
from diffusion.training.train import build_trainer
from test_train import tiny_overrides
from test_yamls import full_then_tiny, latents, tiny_vae  # noqa: F401 (fixtures: tiny VAE folder, latents)

REPO = Path(__file__).resolve().parents[1]


class _CountForwards(Callback):
    def __init__(self):
        self.per_batch = []

    def batch_start(self, state, logger):
        self.per_batch.append(0)

    def after_forward(self, state, logger):
        self.per_batch[-1] += 1


def _fit(demo_photos, out, *extra, batches=2):
    over = tiny_overrides(demo_photos, out, max_duration=f'{batches}ba', eval_interval='100ba') + [
        'save_folder=null', 'callbacks.sample_images.num_inference_steps=1',
        'callbacks.sample_images.prompts=[a cat]', *extra]
    trainer = build_trainer(load_config(REPO / 'yamls/tiny-cpu.yaml', over))
    counter = _CountForwards()
    trainer.state.callbacks.append(counter)
    trainer.fit()
    trainer.close()
    return trainer, counter


def test_speedups_through_a_fit(demo_photos, tmp_path, caplog):
    from composer.algorithms.low_precision_groupnorm.low_precision_groupnorm import LPGroupNorm
    from composer.algorithms.warnings import NoEffectWarning
    caplog.set_level(logging.INFO, logger='diffusion')
    with pytest.warns(NoEffectWarning):  # composer's low-precision norms: nothing to do in fp32 on a CPU
        trainer, counter = _fit(
            demo_photos, tmp_path, 'algorithms.channels_last={}', 'algorithms.low_precision_groupnorm={}',
            'algorithms.low_precision_layernorm={}', 'algorithms.activation_checkpointing={}',
            'device_train_microbatch_size=4')
    assert int(trainer.state.timestamp.batch) == 2 and torch.isfinite(trainer.state.loss).all()
    assert counter.per_batch == [2, 2]  # global batch 8 in microbatches of 4: gradient accumulation
    backbone = trainer.state.model.backbone
    assert backbone.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, LPGroupNorm) for m in backbone.modules())
    policy = [m for m in backbone.modules() if backbone.activation_checkpointing_fn(m)]
    checkpointed = [m for m in backbone.modules() if getattr(m, '_checkpointed_forward', False)]
    assert policy and checkpointed == policy
    report = '\n'.join(r.getMessage() for r in caplog.records if r.getMessage().startswith('speed-up'))
    assert 'low_precision_groupnorm: no effect here' in report
    assert 'low_precision_layernorm: no effect here' in report
    assert 'channels_last: acts' in report
    assert 'gradient accumulation: acts, 2 microbatches of 4' in report
    assert 'attention: sdpa: acts' in report
    assert any('activation_checkpointing: acts' in r.getMessage() for r in caplog.records)


def test_compile_backbone_through_a_fit(demo_photos, tmp_path):
    # The `eager` backend runs TorchDynamo's graph capture without code generation, on a one-layer-per-block UNet
    # (tracing time grows with the number of modules): fast enough for a test.
    trainer, _ = _fit(demo_photos, tmp_path, 'algorithms.compile_backbone.backend=eager',
                      'model.backbone.layers_per_block=1', batches=1)
    backbone = trainer.state.model.backbone
    assert backbone._compiled_call_impl is not None  # nn.Module.compile, in place
    assert torch.isfinite(trainer.state.loss).all()
    assert not any('_orig_mod' in k for k in trainer.state.model.state_dict())  # checkpoint keys unchanged


def test_cpu_bf16_autocast_and_fused_adamw_through_a_fit(demo_photos, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger='diffusion')
    trainer, _ = _fit(demo_photos, tmp_path, 'algorithms.cpu_bf16_autocast={}', 'optimizer.name=adamw',
                      'optimizer.fused=true', batches=1)
    opt = trainer.state.optimizers[0]
    assert type(opt) is torch.optim.AdamW and opt.defaults['fused']  # torch's fused kernel, from the YAML
    backbone = trainer.state.model.backbone
    assert backbone._cpu_bf16_autocast and torch.isfinite(trainer.state.loss).all()
    assert any('cpu_bf16_autocast: acts' in r.getMessage() for r in caplog.records)
    # The forward runs its convolutions in bf16 but hands back fp32, close to (not equal to) the fp32 forward.
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text = torch.randn(2, 5, backbone.unet.config.cross_attention_dim)
    with torch.no_grad():
        mixed = backbone(x, t, text_hidden=text)
        plain = backbone.forward.args[0](x, t, text_hidden=text)  # the wrapped fp32 forward
    assert mixed.dtype == plain.dtype == torch.float32
    assert not torch.equal(mixed, plain)
    torch.testing.assert_close(mixed, plain, rtol=0.1, atol=0.05)
    assert not any('_cpu_bf16' in k for k in trainer.state.model.state_dict())  # checkpoint keys unchanged


def test_activation_checkpointing_keeps_gradients():
    from diffusion.algorithms.activation_checkpointing import apply_activation_checkpointing
    from diffusion.models.unet import build_unet

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = build_unet('mini-s', sample_size=8, block_out_channels=(32, 32, 32, 32))

    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 384)

    def grads(model):
        model.zero_grad()
        model.backbone(x, t, text_hidden=text).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, checkpointed = Holder(), Holder()
    assert apply_activation_checkpointing(checkpointed) > 0
    for a, b in zip(grads(plain), grads(checkpointed)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _fsdp_plan(model):
    """What composer's FSDP (``prepare_fsdp_module``) would do: per child of the ComposerModel, skip it when
    ``_fsdp_wrap`` is False (it stays whole, replicated) or wrap it with the child's ``fsdp_wrap_fn`` units."""
    from torchmetrics import Metric
    plan = {}
    for name, child in model.named_children():
        if isinstance(child, Metric):
            continue
        if hasattr(child, '_fsdp_wrap') and not child._fsdp_wrap:
            plan[name] = 'replicated'
            continue
        fn = getattr(child, 'fsdp_wrap_fn', None)
        plan[name] = [m for m in child.modules() if fn is not None and fn(m)]
    return plan


@pytest.mark.parametrize('yaml', ['tiny-cpu.yaml', 'microdit/mini-cpu.yaml'])
def test_fsdp_wraps_only_the_trainable_backbone(yaml):
    from diffusion import registry
    cfg = load_config(REPO / 'yamls' / yaml, ['variables.data=/nonexistent'])
    model = registry.build(registry.models, cfg.model, 'model')
    plan = _fsdp_plan(model)
    assert plan['text_encoder'] == 'replicated' and plan['autoencoder'] == 'replicated'
    units = plan['backbone']
    assert len(units) >= 4 and set(plan) == {'backbone', 'text_encoder', 'autoencoder'}
    # Frozen parameters live only in the replicated parts; every trainable one is in the sharded backbone.
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith('backbone.'), name
    # Each FSDP unit is a block of the backbone and holds trainable parameters only.
    assert all(p.requires_grad for unit in units for p in unit.parameters())
    # Activation checkpointing targets are backbone blocks too (composer applies the policy under FSDP).
    targets = [m for m in model.backbone.modules() if model.backbone.activation_checkpointing_fn(m)]
    assert targets and all(any(t is u or t in set(u.modules()) for u in units) for t in targets)


def test_export_weights_before_a_delayed_ema_start_are_the_training_weights():
    # Before `ema_start`, composer's EMA keeps a copy of the INITIAL weights (made at Event.INIT) in every
    # checkpoint; generation and export must then use the training weights, not that copy.
    from diffusion.checkpoints import model_weights
    trained, initial = {'w': torch.ones(2)}, {'w': torch.zeros(2)}
    ema = {'ema_model': {'named_parameters_dict': initial, 'named_buffers_dict': {}},
           'ema_weights_active': False, 'ema_started': False}
    state = {'state': {'model': trained, 'algorithms': [('EMA', ema)]}}
    weights, chosen, has_ema = model_weights(state, 'auto')
    assert chosen == 'training' and not has_ema and torch.equal(weights['w'], trained['w'])
    ema['ema_started'] = True
    weights, chosen, has_ema = model_weights(state, 'auto')
    assert chosen == 'ema' and has_ema and torch.equal(weights['w'], initial['w'])


def _lp_norms(module):
    from composer.algorithms.low_precision_groupnorm.low_precision_groupnorm import LPGroupNorm
    from composer.algorithms.low_precision_layernorm.low_precision_layernorm import LPLayerNorm
    return [m for m in module.modules() if isinstance(m, (LPGroupNorm, LPLayerNorm))]


def test_low_precision_norms_go_into_the_backbone_only(demo_photos, tmp_path, monkeypatch):
    # Composer's algorithms operate on the whole model: under amp_bf16 the frozen text encoder's LayerNorms and the
    # VAE's GroupNorms were replaced by new, trainable modules that joined the optimizer.
    monkeypatch.setenv('DIFFUSION_EMULATE_GPU_PRECISION', '1')
    over = tiny_overrides(demo_photos, tmp_path, max_duration='1ba') + [
        'precision=amp_bf16', 'save_folder=null', 'algorithms.low_precision_groupnorm={}',
        'algorithms.low_precision_layernorm={}']
    trainer = build_trainer(load_config(REPO / 'yamls/tiny-cpu.yaml', over))
    model = trainer.state.model
    assert _lp_norms(model.backbone), 'the backbone norms were not replaced'
    assert not _lp_norms(model.text_encoder) and not _lp_norms(model.autoencoder)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    optimized = {id(p) for group in trainer.state.optimizers[0].param_groups for p in group['params']}
    assert optimized == {id(p) for p in model.backbone.parameters()}


def test_microdit_recipe_with_two_lr_groups_takes_low_precision_layernorm(demo_photos, tiny_vae, latents, tmp_path,
                                                                          monkeypatch):
    # The real recipe (experts at half the LR: two parameter groups) under amp_bf16: composer's whole-model
    # surgery raised 'Parameter groups [-1, -1] are not in the optimizer' (the text encoder's norms are in none).
    monkeypatch.setenv('DIFFUSION_EMULATE_GPU_PRECISION', '1')
    raw = full_then_tiny('microdit/256-masked.yaml', demo_photos, tiny_vae, latents)
    assert 'low_precision_layernorm' in raw['algorithms'] and raw['model']['backbone']['moe_lr_scale'] == 0.5
    raw.update(precision='amp_bf16', save_folder=str(tmp_path / 'ckpt'), max_duration='1ba')
    raw['callbacks']['sample_images']['folder'] = str(tmp_path / 'samples')
    trainer = build_trainer(load_config(base=raw))
    model, groups = trainer.state.model, trainer.state.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]['lr'] == groups[0]['lr'] * 0.5
    assert _lp_norms(model.backbone) and not _lp_norms(model.text_encoder)
    grouped = {id(p) for g in groups for p in g['params']}
    assert grouped == {id(p) for p in model.backbone.parameters() if p.requires_grad}


def test_ema_leaves_integer_buffers_alone(demo_photos, tmp_path):
    # Composer's EMA averaged the text encoder's integer position_ids in float and truncated them back: with
    # smoothing 0.9999 about a fifth of them were wrong after one update, whenever the EMA weights were swapped in.
    from diffusion.callbacks.sample_images import ema_weights
    trainer, _ = _fit(demo_photos, tmp_path, 'algorithms.ema.smoothing=0.9999', 'algorithms.ema.half_life=null',
                      'algorithms.ema.ema_start=0ba', 'algorithms.ema.update_interval=1ba')
    model = trainer.state.model
    integers = {n: b.clone() for n, b in model.named_buffers() if not b.is_floating_point()}
    assert any('position_ids' in n for n in integers)
    with ema_weights(trainer.state) as weights:
        assert weights == 'ema'
        for name, buffer in model.named_buffers():
            if name in integers:
                assert torch.equal(buffer, integers[name]), name
