"""``convert/precompute_latents.py``: columns, the one scaling convention, the empty caption, ranks, resume.

The autoencoder is a tiny randomly initialised ``AutoencoderKL`` (no pretrained VAE installs offline) saved with
``save_pretrained`` and loaded by path as a user loads the SD2 VAE; its ``scaling_factor`` is set to 0.37 so a
scale applied twice, or never, would show. The text encoder is the real MiniLM that ships in a package.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RES = 32
SCALE = 0.37


def _cli():
    spec = importlib.util.spec_from_file_location('precompute_cli', REPO / 'convert' / 'precompute_latents.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny_vae(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    from diffusion.models.autoencoders import TINY_VAE_CONFIG
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, 'scaling_factor': SCALE})
    folder = tmp_path_factory.mktemp('tiny_vae')
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def precomputed(tiny_vae, demo_photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('latents')
    args = ['--src', str(demo_photos), '--out', str(out), '--vae', str(tiny_vae), '--resolutions', str(RES), '16',
            '--batch-size', '4', '--commit-every', '5', '--device', 'cpu']
    assert _cli().main(args) == 0
    return out


def _loader(local: Path, split: str, **kw):
    from diffusion.data.dataset import build_image_caption_dataloader
    return build_image_caption_dataloader(batch_size=4, local=str(local), split=split, resolution=RES, crop='center',
                                          random_flip=False, caption_dropout=0.0, shuffle=False, drop_last=False,
                                          **kw).dataloader


def test_columns_shapes_and_files(precomputed, demo_photos):
    from safetensors.torch import load_file

    from diffusion.data.mds_rows import RowReader, find_splits
    meta = json.loads((precomputed / 'latents.json').read_text())
    assert meta['scaling_factor'] == pytest.approx(SCALE)
    assert meta['columns'][f'latents_{RES}'] == f'ndarray:float16:4,{RES // 4},{RES // 4}'
    assert meta['columns']['latents_16'] == 'ndarray:float16:4,4,4'
    assert meta['columns']['text_hidden'] == 'ndarray:float16:77,384'
    for split in find_splits(demo_photos):
        src, dst = RowReader(demo_photos, split), RowReader(precomputed, split)
        assert len(dst) == len(src)
        assert set(dst.columns) == set(src.columns) | {f'latents_{RES}', 'latents_16', 'text_hidden', 'text_mask',
                                                       'text_pooled'}
        for j in range(len(dst)):
            assert dst.raw(j)['image'] == src.raw(j)['image'] and dst.raw(j)['caption'] == src.raw(j)['caption']
            row = dst.row(j, [f'latents_{RES}', 'text_hidden', 'text_mask', 'text_pooled'])
            assert row[f'latents_{RES}'].dtype == np.float16 and row[f'latents_{RES}'].shape == (4, RES // 4, RES // 4)
            assert row['text_mask'].dtype == np.uint8 and 2 < row['text_mask'].sum() < 77
            assert row['text_pooled'].shape == (384,)
    # The empty caption, stored once, as the text encoder encodes ''.
    import diffusion.models  # noqa: F401
    from diffusion import registry
    empty = load_file(str(precomputed / 'empty_caption.safetensors'))
    assert empty['text_hidden'].shape == (77, 384) and empty['text_mask'].shape == (77,)
    online = registry.build(registry.text_encoders, {'name': 'minilm'})([''])
    torch.testing.assert_close(empty['text_hidden'].float(), online['text_hidden'][0], atol=2e-3, rtol=2e-3)
    assert torch.equal(empty['text_mask'], online['text_mask'][0])
    assert int(empty['text_mask'].sum()) == 2  # [CLS] [SEP]


def test_model_sees_same_latents_online_and_precomputed(precomputed, demo_photos, tiny_vae):
    """Same images through the dataset's pixel path + online encoding, and through the precomputed columns:
    LatentDiffusion gets the same scaled latents (fp16 tolerance) and the same text states."""
    from torch import nn

    import diffusion.models  # noqa: F401
    from diffusion import registry
    from diffusion.models.latent_diffusion import LatentDiffusion
    ae = registry.build(registry.autoencoders, {'name': 'autoencoder_kl', 'pretrained': str(tiny_vae)})
    te = registry.build(registry.text_encoders, {'name': 'minilm'})
    model = LatentDiffusion(backbone=nn.Identity(), noise_schedule=None, autoencoder=ae, text_encoder=te)
    assert model.scaling_factor == pytest.approx(SCALE)
    n = 0
    for pixel_batch, latent_batch in zip(_loader(demo_photos, 'train'), _loader(precomputed, 'train', use_latents=RES)):
        assert pixel_batch['caption'] == latent_batch['caption']
        online, stored = model.batch_latents(pixel_batch), model.batch_latents(latent_batch)  # (B, 4, 8, 8)
        assert online.shape == stored.shape == (len(pixel_batch['caption']), 4, RES // 4, RES // 4)
        torch.testing.assert_close(stored, online, atol=2e-3, rtol=2e-3)
        # Scaled exactly once: the stored column is the raw latent.
        raw = ae.encode(pixel_batch['image'])
        torch.testing.assert_close(latent_batch['latents'].float(), raw, atol=2e-3, rtol=2e-3)  # stored fp16
        assert (online - raw).abs().max() > 0.01  # the scale (0.37) really changes the values
        text_online = te(pixel_batch['caption'])
        torch.testing.assert_close(latent_batch['text_hidden'].float(), text_online['text_hidden'], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(latent_batch['text_mask'].long(), text_online['text_mask'])
        n += len(pixel_batch['caption'])
    assert n >= 8


def test_ranks_merge_and_resume(precomputed, demo_photos, tiny_vae, tmp_path):
    """Two ranks (run one after the other without torch.distributed) write the same rows as one rank; a re-run
    resumes with nothing to do; other arguments are refused."""
    from diffusion.data.mds_rows import RowReader, find_splits, map_dataset
    cli = _cli()
    argv = ['--src', str(demo_photos), '--out', str(tmp_path), '--vae', str(tiny_vae), '--resolutions', str(RES),
            '16', '--batch-size', '4', '--commit-every', '5', '--device', 'cpu']
    args = cli.parse_args(argv)
    encoder = cli.build_encoder(args, 'cpu')
    config = {k: v for k, v in vars(args).items() if k not in ('out', 'device', 'batch_size', 'splits')}
    run = dict(fn=cli.EncodeRows(encoder), new_columns=encoder.columns(), config=config, batch_size=4,
               commit_every=5, world=2)
    assert map_dataset(demo_photos, tmp_path, rank=1, **run) == {}
    report = map_dataset(demo_photos, tmp_path, rank=0, **run)
    for split in find_splits(demo_photos):
        one, two = RowReader(precomputed, split), RowReader(tmp_path, split)
        assert len(one) == len(two) and report['splits'][split] == len(two)
        a = {one.row(i, ['key'])['key']: one.row(i, [f'latents_{RES}'])[f'latents_{RES}'] for i in range(len(one))}
        b = {two.row(i, ['key'])['key']: two.row(i, [f'latents_{RES}'])[f'latents_{RES}'] for i in range(len(two))}
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    index = (tmp_path / 'train' / 'index.json').read_text()
    assert 'rank-00000/' in index and 'rank-00001/' in index

    calls = []

    def counting(rows):
        calls.append(len(rows))
        return run['fn'](rows)

    map_dataset(demo_photos, tmp_path, rank=1, **{**run, 'fn': counting})
    map_dataset(demo_photos, tmp_path, rank=0, **{**run, 'fn': counting})
    assert calls == [] and (tmp_path / 'train' / 'index.json').read_text() == index
    with pytest.raises(ValueError, match='other arguments'):
        map_dataset(demo_photos, tmp_path, rank=0, **{**run, 'config': {**config, 'resolutions': [RES]}})
    # A row whose image does not decode is skipped with a reason, not a crash; its neighbours are encoded.
    good = RowReader(demo_photos, 'train').row(0)
    results = run['fn']([{**good, 'image': b'not an image'}, good])
    assert results[0] == 'image_unreadable' and f'latents_{RES}' in results[1]
