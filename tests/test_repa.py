"""REPA (diffusion/algorithms/repa.py): the cosine loss against a hand computation, the feature encoders by name,
where the gradient goes (projector and backbone, never the encoder), weight 0 is training without REPA bit for
bit, an autoresumed run continues exactly with the projector restored and no encoder in the checkpoint, and a real
``Trainer.fit`` of the example recipe."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from diffusion.algorithms.repa import (PROJECTOR_NAME, Repa, align_features, alignment_block, build_feature_encoder,
                                       repa_loss)
from diffusion.models.latent_diffusion import LatentDiffusion
from diffusion.models.microdit import build_microdit
from diffusion.schedules import EDMSchedule

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(dim=64, head_dim=16, multiple_of=32, patch_mixer_dim=32, sample_size=8, cross_attention_dim=32,
             mask_ratio=0.0)
ENCODER = {'encoder': 'torchvision:squeezenet1_1', 'encoder_options': {'image_size': 64}}  # random: 512-d on 3x3


# --------------------------------------------------------------------------------------------- the loss


def test_loss_is_the_negative_mean_cosine_of_matching_tokens():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    by_hand = -(a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(repa_loss(a, b), by_hand.mean())
    # Same directions (any positive scale) give -1, opposite +1, orthogonal 0.
    torch.testing.assert_close(repa_loss(a, 3.5 * a), torch.tensor(-1.0))
    torch.testing.assert_close(repa_loss(a, -a), torch.tensor(1.0))
    e = torch.eye(4)
    assert repa_loss(e[None, :2], e[None, 2:]).item() == 0.0
    with pytest.raises(ValueError, match='differ in shape'):
        repa_loss(a, b[:, :4])


def test_loss_gradient_is_the_cosine_derivative():
    a = torch.tensor([[[3.0, 4.0]]], requires_grad=True)
    f = torch.tensor([[[1.0, 0.0]]])
    repa_loss(a, f).backward()
    # d/da -(a.f)/(|a||f|) = -(f/|a| - (a.f) a/|a|^3) = -([1,0]/5 - 3 [3,4]/125)
    torch.testing.assert_close(a.grad, -(torch.tensor([[[0.2, 0.0]]]) - 3 * torch.tensor([[[3.0, 4.0]]]) / 125))


def test_features_are_interpolated_to_the_token_grid():
    feats = torch.randn(2, 4, 3)  # a 2x2 grid of 3-d features
    assert align_features(feats, (2, 2), (2, 2)) is feats
    up = align_features(feats, (2, 2), (4, 4))
    assert up.shape == (2, 16, 3)
    # A constant map stays constant; the corners of a 2x -> 4x bilinear upsampling keep the corner values.
    const = torch.ones(1, 9, 2) * 0.7
    torch.testing.assert_close(align_features(const, (3, 3), (5, 5)), torch.full((1, 25, 2), 0.7))
    torch.testing.assert_close(up.view(2, 4, 4, 3)[:, 0, 0], feats[:, 0])


# --------------------------------------------------------------------------------------------- encoders


def test_encoders_by_name_are_frozen_patch_token_extractors(tmp_path):
    images = torch.rand(2, 3, 48, 48) * 2 - 1
    resnet = build_feature_encoder('torchvision:resnet18', image_size=64)  # random weights (weights=None)
    assert (resnet.dim, resnet.grid) == (512, (2, 2)) and resnet(images).shape == (2, 4, 512)
    inception = build_feature_encoder('inception', image_size=96)  # the FID network's real weights
    assert inception.dim == 768 and inception(images).shape == (2, inception.grid[0] * inception.grid[1], 768)
    # transformers: REPA's DINOv2 path, here a tiny random Dinov2Model saved to a folder (no hub access).
    from transformers import Dinov2Config, Dinov2Model
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32)).save_pretrained(tmp_path / 'dino')
    dino = build_feature_encoder(f'transformers:{tmp_path / "dino"}', image_size=32)
    assert (dino.dim, dino.grid) == (32, (4, 4))  # the class token dropped: 16 patch tokens
    with torch.no_grad():
        x = F.interpolate(images, size=(32, 32), mode='bicubic', align_corners=False, antialias=True)
        x = ((x.clamp(-1, 1) + 1) / 2 - dino.mean) / dino.std
        expected = dino.net(pixel_values=x).last_hidden_state[:, 1:]
    torch.testing.assert_close(dino(images), expected)
    for enc in (resnet, inception, dino):
        assert not enc.train().training and not any(p.requires_grad for p in enc.parameters())
        assert not enc(images).requires_grad
    with pytest.raises(ValueError, match='unknown feature encoder'):
        build_feature_encoder('dinov2')


def test_aligned_block_default_and_checks():
    net = build_microdit('microdit-mini', **{**SMALL, 'depth': 8})
    assert alignment_block(net)[1:] == ('blocks.2', 64)  # depth // 4
    with pytest.raises(ValueError, match='must be in'):
        alignment_block(net, 8)
    routed = build_microdit('microdit-mini', **{**SMALL, 'tread': {'ratio': 0.5, 'start': 1, 'end': 3}})
    assert alignment_block(routed, 3)[1] == 'blocks.3'
    with pytest.raises(ValueError, match='TREAD range'):
        alignment_block(routed, 2)


# --------------------------------------------------------------------------------------------- training


def _model() -> LatentDiffusion:
    torch.manual_seed(0)
    backbone = build_microdit('microdit-mini', **SMALL)
    with torch.no_grad():  # the zero-initialised output layers would leave the early blocks without a gradient
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return LatentDiffusion(backbone, EDMSchedule(sigma_data=0.9, p_mean=-0.6, p_std=1.2), scaling_factor=1.0)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    rows = [{'latents': torch.randn(4, 8, 8, generator=g), 'text_hidden': torch.randn(7, 32, generator=g),
             'image': torch.rand(3, 32, 32, generator=g) * 2 - 1} for _ in range(8)]
    return DataLoader(rows, batch_size=2, shuffle=False)


class _Grads(Callback):
    """The gradients of the first batch, after the backward pass."""

    def __init__(self):
        self.grads = None

    def after_backward(self, state, logger):
        if self.grads is None:
            self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in state.model.named_parameters()}


def _trainer(algorithms=(), duration='2ba', **kwargs) -> Trainer:
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return Trainer(model=model, train_dataloader=_loader(), optimizers=opt, max_duration=duration,
                   algorithms=list(algorithms), device='cpu', seed=3, progress_bar=False, log_to_console=False,
                   **kwargs)


def _fit(algorithms=()) -> tuple[Trainer, dict]:
    grads = _Grads()
    trainer = _trainer(algorithms, callbacks=[grads])
    trainer.fit()
    return trainer, grads.grads


@pytest.fixture(scope='module')
def plain():
    """Two batches without REPA: the first batch's gradients and the trained model."""
    return _fit()


def test_gradient_reaches_projector_and_backbone_never_the_encoder(plain):
    algo = Repa(weight=0.5, **ENCODER)
    trainer, grads = _fit([algo])
    base = plain[1]
    assert algo.block is None and trainer.state.model.backbone.blocks[1] is alignment_block(
        trainer.state.model.backbone)[0]  # depth 6: block 1
    proj = [n for n in grads if n.startswith(f'{PROJECTOR_NAME}.')]
    assert proj and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in proj)
    # The REPA term changes the gradient of the blocks up to the aligned one (1), never of the later ones.
    assert not torch.equal(grads['backbone.blocks.0.attn.qkv.weight'], base['backbone.blocks.0.attn.qkv.weight'])
    assert not torch.equal(grads['backbone.blocks.1.attn.qkv.weight'], base['backbone.blocks.1.attn.qkv.weight'])
    later = [n for n in base if n.startswith(('backbone.blocks.2.', 'backbone.blocks.5.', 'backbone.final_'))]
    assert later and all(torch.equal(grads[n], base[n]) for n in later)
    # The encoder: no gradient, unchanged after two optimizer steps, in eval mode, and not a part of the model.
    assert all(p.grad is None and not p.requires_grad for p in algo.encoder.parameters())
    torch.manual_seed(0)  # Repa builds its encoder with its seed (0) on a stream of its own: the same random weights
    fresh = build_feature_encoder(ENCODER['encoder'], **ENCODER['encoder_options'])
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in algo.encoder.state_dict().items())
    assert not algo.encoder.training
    assert not any(m is algo.encoder.net for m in trainer.state.model.modules())


def test_weight_zero_trains_bit_identically_to_no_repa(plain):
    trainer, _ = _fit([Repa(weight=0.0, **ENCODER)])
    first, second = plain[0].state.model.state_dict(), trainer.state.model.state_dict()
    assert first.keys() == second.keys() and not hasattr(trainer.state.model, PROJECTOR_NAME)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_continues_exactly_and_the_checkpoint_has_no_encoder(tmp_path):
    def run(folder, duration, **kw):
        logger = InMemoryLogger()
        trainer = _trainer([Repa(weight=0.5, projector_dim=64, **ENCODER)], duration=duration,
                           save_folder=str(folder), save_interval='2ba', loggers=[logger], **kw)
        trainer.fit()
        trainer.close()
        return trainer, logger

    whole, logger = run(tmp_path / 'whole', '3ba')
    # The logged total is the diffusion loss plus 0.5 x the REPA term.
    data = logger.data
    total, diff, term = (torch.stack([torch.as_tensor(v).float().reshape(()) for _, v in data[k]])
                         for k in ('loss/train/total', 'loss/train/diffusion', 'loss/train/repa'))
    torch.testing.assert_close(total, diff + 0.5 * term)
    assert ((term > -1) & (term < 1)).all()

    ckpt_path = tmp_path / 'whole' / 'ep0-ba2-rank0.pt'
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    model_keys = list(ckpt['state']['model'])
    assert model_keys and not any(PROJECTOR_NAME in k or k.startswith('encoder') for k in model_keys)
    repa_state = dict(ckpt['state']['algorithms'])['Repa']
    assert set(repa_state) == {'repr', 'projector'}  # the projector only: no encoder weights
    assert sum(v.numel() for v in repa_state['projector'].values()) < 200_000
    # Resumed from batch 2, the run ends where the uninterrupted one did, projector and optimizer included.
    resumed, _ = run(tmp_path / 'resumed', '3ba', load_path=str(ckpt_path))
    a, b = whole.state.model, resumed.state.model
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)
    for (name, p), q in zip(getattr(a, PROJECTOR_NAME).named_parameters(), getattr(b, PROJECTOR_NAME).parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_masked_steps_are_refused():
    model = _model()
    model.backbone.mask_ratio = 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = Trainer(model=model, train_dataloader=_loader(), optimizers=opt, max_duration='1ba',
                      algorithms=[Repa(**ENCODER)], device='cpu', progress_bar=False, log_to_console=False)
    with pytest.raises(ValueError, match='masked patches'):
        trainer.fit()


def test_example_recipe_fits(demo_photos, tmp_path):
    """yamls/microdit/mini-cpu-repa.yaml: a real short fit with the inception encoder, the term logged, the
    checkpoint without the encoder and loadable for generation by the usual path."""
    from diffusion.checkpoints import load_model
    from diffusion.config import load_config
    from diffusion.training.train import build_trainer
    over = {'variables.data': str(demo_photos), 'save_folder': str(tmp_path / 'ckpt'), 'max_duration': '2ba',
            'eval_interval': '2ba', 'save_interval': '2ba', 'eval_first': 'false', 'global_train_batch_size': '2',
            'device_eval_batch_size': '2', 'eval_subset_num_batches': '1',
            'callbacks.sample_images.num_inference_steps': '1', 'callbacks.sample_images.prompts': '[a cat]',
            'callbacks.sample_images.folder': str(tmp_path / 'samples'),
            'algorithms.repa.encoder_options.image_size': '96'}
    cfg = load_config(REPO / 'yamls/microdit/mini-cpu-repa.yaml', [f'{k}={v}' for k, v in over.items()])
    trainer = build_trainer(cfg)
    logger = InMemoryLogger()
    logger.init(trainer.state, trainer.logger)
    trainer.logger.destinations = (*trainer.logger.destinations, logger)
    trainer.fit()
    trainer.close()
    assert len(logger.data['loss/train/repa']) == 2 and torch.isfinite(trainer.state.loss)
    ckpt = next((tmp_path / 'ckpt').glob('ep*-ba2-rank0.pt'))
    state = torch.load(ckpt, map_location='cpu', weights_only=False)['state']
    assert not any(k.startswith(('repa', 'encoder')) or '.net.' in k for k in state['model'])
    model, _ = load_model(tmp_path / 'ckpt')  # the weights load as a model without REPA
    assert not hasattr(model, PROJECTOR_NAME)
