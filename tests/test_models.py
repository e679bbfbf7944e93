"""The LatentDiffusion model with real parts at tiny size: text encoders, autoencoder, both data paths,
caption dropout, SDXL-style conditioning, generation, and the FSDP wrapping policy."""
import pytest
import torch

from diffusion import registry
from diffusion.models.latent_diffusion import LatentDiffusion, build_latent_diffusion


def tiny_model(**kwargs) -> LatentDiffusion:
    blocks = dict(
        autoencoder={'name': 'autoencoder_kl', 'config': 'tiny'},
        text_encoder={'name': 'minilm'},
        backbone={'name': 'unet', 'preset': 'mini-s', 'sample_size': 8},
        noise_schedule={'name': 'ddpm', 'prediction_type': 'v_prediction'},
    )
    blocks.update(kwargs)
    torch.manual_seed(0)
    return build_latent_diffusion(**blocks)


@pytest.fixture(scope='module')
def model():
    return tiny_model().eval()


@pytest.fixture(scope='module')
def batch():
    g = torch.Generator().manual_seed(0)
    return {'image': torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
            'caption': ['a red apple on a table', 'a dog'],
            'caption_dropped': torch.tensor([False, False])}


def test_minilm_encoder_is_real_and_frozen(model):
    te = model.text_encoder
    out = te(['a photo of a cat', ''])
    assert out['text_hidden'].shape == (2, 77, 384)
    assert out['text_mask'][0].sum() == 7 and out['text_mask'][1].sum() == 2  # [CLS] a photo of a cat [SEP]
    assert out['text_pooled'].shape == (2, 384)
    assert not any(p.requires_grad for p in te.parameters())
    # Real pretrained weights: related sentences are closer than unrelated ones.
    pooled = torch.nn.functional.normalize(te(['a photo of a cat', 'a picture of a kitten',
                                               'stock market report'])['text_pooled'], dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


def test_clip_tokenizer_built_from_open_clip_bpe_is_the_real_one():
    te = registry.build(registry.text_encoders, {'name': 'tiny_clip'})
    ids = te.tokenize(['a photo of a cat'])['input_ids'][0]
    assert ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(te.tokenizers[0]) == 49408


def test_sdxl_pair_concatenates_states_and_pools_from_second():
    te = registry.build(registry.text_encoders, {'name': 'tiny_clip', 'pair': True, 'hidden_size': 32})
    out = te(['hello world'])
    assert out['text_hidden'].shape == (1, 77, 32 + 64) and te.hidden_dim == 96
    assert out['text_pooled'].shape == (1, te.pooled_dim)


def test_unknown_pretrained_name_gives_clear_offline_error():
    with pytest.raises(OSError, match='no-such-org/no-such-vae'):
        registry.build(registry.autoencoders, {'name': 'autoencoder_kl', 'pretrained': 'no-such-org/no-such-vae',
                                               'subfolder': 'vae'})


def test_pixel_and_precomputed_paths_give_the_same_loss(model, batch):
    raw = model.autoencoder.encode(batch['image'])  # what convert/precompute_latents.py stores
    text = model.text_encoder(batch['caption'])
    pre = {'latents': raw.half(), 'caption_dropped': batch['caption_dropped'], 'caption': batch['caption'],
           **{k: v.half() if v.is_floating_point() else v for k, v in text.items()}}
    loss_pix = model.loss(model.eval_forward(batch), batch)
    loss_pre = model.loss(model.eval_forward(pre), pre)
    torch.testing.assert_close(loss_pre, loss_pix, rtol=2e-2, atol=1e-3)  # fp16 storage
    # Scaling is applied once: the model sees latents * scaling_factor on both paths.
    torch.testing.assert_close(model.batch_latents(pre), model.encode_images(batch['image']), rtol=1e-2, atol=1e-3)


def test_eval_loss_is_deterministic_and_train_loss_is_not(model, batch):
    a = model.loss(model.eval_forward(batch), batch)
    b = model.loss(model.eval_forward(batch), batch)
    assert torch.equal(a, b)
    c, d = model.loss(model(batch), batch), model.loss(model(batch), batch)
    assert not torch.equal(c, d)


def test_caption_dropout_on_precomputed_text_uses_empty_caption(model, batch):
    text = model.text_encoder(batch['caption'])
    pre = {'latents': torch.zeros(2, 4, 8, 8), 'caption_dropped': torch.tensor([True, False]), **text}
    cond = model.batch_conditioning(pre)
    empty = model.text_encoder([''])['text_hidden'][0]
    torch.testing.assert_close(cond['text_hidden'][0], empty)
    torch.testing.assert_close(cond['text_hidden'][1], text['text_hidden'][1])


def test_empty_caption_file_is_used_without_text_encoder(tmp_path, model):
    from safetensors.torch import save_file
    empty = {k: v[0].contiguous() for k, v in model.text_encoder(['']).items()}
    save_file(empty, tmp_path / 'empty_caption.safetensors')
    latent_only = LatentDiffusion(model.backbone, model.noise_schedule, autoencoder=None, text_encoder=None,
                                  scaling_factor=model.scaling_factor,
                                  empty_caption_path=str(tmp_path / 'empty_caption.safetensors'))
    text = model.text_encoder(['x', 'y'])
    cond = latent_only.batch_conditioning({'caption_dropped': torch.tensor([False, True]), **text})
    torch.testing.assert_close(cond['text_hidden'][1], empty['text_hidden'])


def test_sdxl_style_model_uses_pooled_text_and_time_ids():
    model = tiny_model(text_encoder={'name': 'tiny_clip', 'pair': True, 'hidden_size': 32},
                       backbone={'name': 'unet', 'preset': 'mini-l', 'sample_size': 8}, use_time_ids=True)
    assert model.backbone.uses_added_conditioning
    batch = {'image': torch.rand(2, 3, 32, 32) * 2 - 1, 'caption': ['a', 'b'],
             'original_size': torch.tensor([[64, 48], [32, 32]]), 'crop_top_left': torch.tensor([[0, 8], [0, 0]]),
             'target_size': torch.tensor([[32, 32], [32, 32]])}
    loss = model.loss(model(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.unet.add_embedding.linear_1.weight.grad is not None
    images = model.generate(['a'], num_inference_steps=2, height=32, width=32)
    assert images.shape == (1, 3, 32, 32)


def test_generate_shape_range_and_seed(model):
    kw = dict(num_inference_steps=3, guidance_scale=4.0, height=32, width=32)
    a = model.generate(['a cat', 'a dog'], seed=1, **kw)
    b = model.generate(['a cat', 'a dog'], seed=1, **kw)
    c = model.generate(['a cat', 'a dog'], seed=2, **kw)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    pil = model.generate(['a cat'], seed=1, output_type='pil', **kw)
    assert pil[0].size == (32, 32)


def test_guidance_one_equals_conditional_branch(model):
    """With guidance 1 the unconditional branch is skipped; negative prompts then change nothing."""
    kw = dict(num_inference_steps=2, height=32, width=32, seed=3, guidance_scale=1.0)
    torch.testing.assert_close(model.generate(['a cat'], **kw),
                               model.generate(['a cat'], negative_prompts=['blurry'], **kw))
    neg = model.generate(['a cat'], negative_prompts=['blurry'], **{**kw, 'guidance_scale': 5.0})
    plain = model.generate(['a cat'], **{**kw, 'guidance_scale': 5.0})
    assert not torch.equal(neg, plain)


def test_only_backbone_is_trainable_and_fsdp_policy(model):
    trainable = {n.split('.')[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {'backbone'}
    assert model.autoencoder._fsdp_wrap is False and model.text_encoder._fsdp_wrap is False
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    wrapped = [m for m in model.backbone.modules() if model.backbone.fsdp_wrap_fn(m)]
    assert wrapped and all(isinstance(m, (ResnetBlock2D, Transformer2DModel)) for m in wrapped)
    model.train()
    assert not model.text_encoder.training and not model.autoencoder.training and model.backbone.training
    model.eval()


@pytest.mark.parametrize('schedule,sampler', [({'name': 'edm', 'sigma_data': 0.9}, 'euler'),
                                              ({'name': 'ddpm', 'loss_weighting': 'min_snr'}, 'dpmpp_2m')])
def test_other_schedules_train_and_sample(schedule, sampler, batch):
    """EDM preconditioning (MicroDiT's formulation) and min-SNR weighting run through the same model class."""
    model = tiny_model(noise_schedule=schedule)
    loss = model.loss(model(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    images = model.generate(['a cat'], num_inference_steps=3, height=32, width=32, sampler=sampler, seed=0)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
