"""Autoencoder training: the losses, the discriminator's gradient routing, and ``yamls/autoencoder-mini.yaml``
through a real Composer ``Trainer`` (a few batches on real photos) to a diffusers export with a measured scale."""
import json
from pathlib import Path

import pytest
import torch

from diffusion.models.autoencoder_training import (AutoencoderTraining, PatchDiscriminator, VGGPerceptual,
                                                   build_autoencoder_kl_training)

REPO = Path(__file__).resolve().parents[1]


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_losses_and_discriminator_switch():
    model = build_autoencoder_kl_training(config='tiny', discriminator={'channels': 8, 'num_layers': 2},
                                          disc_start=2, kl_weight=1e-6)
    model.train()
    x = _images()
    out = model({'image': x})
    assert out['recon'].shape == x.shape
    losses = model.loss(out, {'image': x})
    assert set(losses) == {'rec', 'kl', 'total'}  # discriminator not yet on
    torch.testing.assert_close(losses['rec'], (out['recon'] - x).abs().mean())
    expected_kl = out['posterior'].kl().mean() / x[0].numel()
    torch.testing.assert_close(losses['kl'], expected_kl)
    torch.testing.assert_close(losses['total'], losses['rec'] + 1e-6 * losses['kl'])
    model({'image': x})
    losses = model.loss(model({'image': x}), {'image': x})  # third training batch: on
    assert {'disc', 'gen_adv'} <= set(losses) and int(model.train_batches) == 3
    # Eval forward is deterministic (posterior mean) and does not advance the switch.
    model.eval()
    a, b = model.eval_forward({'image': x}), model.eval_forward({'image': x})
    assert torch.equal(a['recon'], b['recon']) and int(model.train_batches) == 3


def test_adversarial_terms_move_only_their_network():
    model = AutoencoderTraining(build_autoencoder_kl_training(config='tiny').vae,
                                discriminator=PatchDiscriminator(channels=8, num_layers=2), disc_start=0)
    model.train()
    x = _images()
    losses = model.loss(model({'image': x}), {'image': x})
    losses['gen_adv'].backward(retain_graph=True)
    assert _grads(model.discriminator) == 0 and _grads(model.vae) > 0  # generator term: VAE only
    model.zero_grad()
    losses['disc'].backward()
    assert _grads(model.vae) == 0 and _grads(model.discriminator) > 0  # discriminator term: D only


def test_vgg_perceptual_loads_local_weights(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(0)
    path = tmp_path / 'vgg16_features.pth'  # random weights: checks loading and the distance, not its meaning
    torch.save({f'features.{k}': v for k, v in make_layers(cfgs['D']).state_dict().items()}, path)
    perceptual = VGGPerceptual(str(path))
    x = _images(2, 32)
    assert float(perceptual(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(perceptual(x, x.flip(-1))) > 0
    model = build_autoencoder_kl_training(config='tiny', perceptual={'weights': str(path)})
    assert 'perceptual' in model.loss(model({'image': x}), {'image': x})


def test_autoencoder_mini_yaml_trains_and_exports(demo_photos, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from diffusion import registry
    from diffusion.config import load_config
    from diffusion.training.train import build_trainer
    monkeypatch.chdir(tmp_path)  # outputs/<run_name>/... go to the temporary folder
    cfg = load_config(REPO / 'yamls' / 'autoencoder-mini.yaml', [
        f'variables.data={demo_photos}', 'variables.resolution=32', 'variables.run_name=ae-test',
        'max_duration=6ba', 'eval_interval=3ba', 'save_interval=6ba', 'global_train_batch_size=4',
        'device_eval_batch_size=4', 'model.disc_start=3', 'scheduler.t_warmup=2ba',
        'callbacks.export_autoencoder.num_batches=2', 'console_log_interval=3ba'])
    trainer = build_trainer(cfg)
    before = {k: v.clone() for k, v in trainer.state.model.vae.state_dict().items()}
    trainer.fit()
    model = trainer.state.model
    assert int(model.train_batches) == 6 and model.disc_active
    assert any(not torch.equal(before[k], v) for k, v in model.vae.state_dict().items())

    grids = sorted((tmp_path / 'outputs' / 'ae-test' / 'reconstructions').glob('ba*.png'))
    assert [g.name for g in grids] == ['ba3.png', 'ba6.png']
    from PIL import Image
    assert Image.open(grids[-1]).size[1] > 2 * 32  # two rows: inputs and reconstructions

    # The export loads like any diffusers VAE and carries the scale measured on the eval images. Its latent
    # channels are centred (the training model is left as it was): each channel's mean over the measured images
    # is 0, the scale is 1 / their std, encodings move by the channel means, and decoding is unchanged.
    folder = tmp_path / 'outputs' / 'ae-test' / 'autoencoder'
    stats = json.loads((folder / 'scaling.json').read_text())
    assert stats['centered'] and len(stats['channel_means']) == 4
    vae = AutoencoderKL.from_pretrained(folder)
    assert vae.config.scaling_factor == pytest.approx(stats['scaling_factor'])
    latents = []
    eval_loader = trainer.state.evaluators[0].dataloader.dataloader  # the batches the export measured on
    for i, batch in enumerate(eval_loader):
        if i == 2:
            break
        latents.append(vae.encode(batch['image']).latent_dist.mean.detach())
    z = torch.cat(latents).double()
    assert z.mean((0, 2, 3)).abs().max() < 1e-4 < max(abs(m) for m in stats['channel_means'])
    assert stats['scaling_factor'] == pytest.approx(1 / float(z.std(unbiased=False)), rel=1e-4)
    assert stats['num_images'] == len(z)
    frozen = registry.build(registry.autoencoders, {'name': 'autoencoder_kl', 'pretrained': str(folder)})
    assert frozen.scaling_factor == pytest.approx(stats['scaling_factor'])
    x = _images(1, 32)
    means = torch.tensor(stats['channel_means']).view(1, -1, 1, 1)
    torch.testing.assert_close(frozen.encode(x), model.encode_raw(x) - means, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(frozen.encode(x)).sample, model.reconstruct(x), atol=1e-5, rtol=1e-5)
