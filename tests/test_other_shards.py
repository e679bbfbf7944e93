"""MDS shards written by other recipes train without re-conversion.

Each layout is written here by streaming's own ``MDSWriter`` with the column names and encodings of the tool
that writes it (read from their converters):

* mosaicml/diffusion ``scripts/convert_coco.py``: ``image`` (jpeg) + ``captions`` (json list, COCO's five);
* mosaicml/diffusion's LAION shards and micro_diffusion's image conversions (``prepare/*/convert.py``):
  ``jpg`` (jpeg, or raw bytes in LAION) + ``caption`` (str), with ``width`` / ``height``;
* micro_diffusion's precomputed latents (``prepare/*/precompute.py``): ``caption`` (str), ``caption_latents``
  (fp16 bytes of 77 x D), ``latents_256`` / ``latents_512`` (fp16 bytes of C x 32 x 32 / C x 64 x 64, already
  multiplied by the VAE scaling factor).
"""
from __future__ import annotations

import gc
import io

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter

from diffusion.data.dataset import StreamingImageCaptionDataset, build_image_caption_dataloader, center_crop

N = 8


def _photo(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (48 + 4 * i, 64, 3), dtype=np.uint8))


def _first_batch(spec) -> dict:
    batch = next(iter(spec.dataloader))
    del spec
    gc.collect()
    return batch


def _write(path, columns, rows) -> str:
    with MDSWriter(out=str(path), columns=columns) as out:
        for row in rows:
            out.write(row)
    return str(path)


@pytest.fixture(scope='module')
def coco_style(tmp_path_factory):
    """mosaicml/diffusion's COCO conversion: five captions per image."""
    rows = [{'image': _photo(i), 'captions': [f'photo {i} caption {k}' for k in range(5)]} for i in range(N)]
    return _write(tmp_path_factory.mktemp('coco') / 'train', {'image': 'jpeg', 'captions': 'json'}, rows)


def test_caption_list_gives_one_caption_per_sample(coco_style):
    kwargs = dict(local=coco_style, resolution=32, image_key='image', caption_key='captions', shuffle=False)
    ds = StreamingImageCaptionDataset(**kwargs, batch_size=N)
    picks = [ds.get_item(i)['caption'] for i in range(N)]
    assert all(p.startswith(f'photo {i} caption ') for i, p in enumerate(picks))
    assert len({p.rsplit(' ', 1)[-1] for p in picks}) > 1  # not always the first of the list
    assert picks == [ds.get_item(i)['caption'] for i in range(N)]  # seeded per sample: same on any worker
    assert ds.get_item(0)['image'].shape == (3, 32, 32)
    with pytest.raises(KeyError, match="caption column 'caption'"):
        StreamingImageCaptionDataset(local=coco_style, resolution=32, batch_size=N).get_item(0)
    del ds
    gc.collect()


@pytest.mark.parametrize('encoding', ['jpeg', 'bytes'])
def test_jpg_column_of_micro_diffusion_and_laion_shards(tmp_path, encoding):
    def image(i):
        if encoding == 'jpeg':
            return _photo(i)
        buf = io.BytesIO()
        _photo(i).save(buf, format='JPEG')
        return buf.getvalue()
    rows = [{'width': 64, 'height': 48 + 4 * i, 'jpg': image(i), 'caption': f'a photo {i}'} for i in range(N)]
    columns = {'width': 'int32', 'height': 'int32', 'jpg': encoding, 'caption': 'str'}
    local = _write(tmp_path / 'train', columns, rows)
    batch = _first_batch(build_image_caption_dataloader(4, local=local, resolution=32, image_key='jpg',
                                                        shuffle=False))
    assert batch['image'].shape == (4, 3, 32, 32) and batch['caption'][1] == 'a photo 1'
    assert batch['original_size'][1].tolist() == [52, 64]
    with pytest.raises(KeyError, match="image column 'image'"):
        StreamingImageCaptionDataset(local=local, resolution=32, batch_size=4).get_item(0)
    gc.collect()


@pytest.fixture(scope='module')
def micro_latents(tmp_path_factory):
    """micro_diffusion's precomputed latents: fp16 bytes, image latents already scaled."""
    rng = np.random.default_rng(0)
    rows, stored = [], []
    for i in range(N):
        lat256 = (rng.standard_normal((4, 32, 32)) * 0.13025).astype(np.float16)
        stored.append(lat256)
        rows.append({'caption': f'latent photo {i}',
                     'caption_latents': rng.standard_normal((77, 8)).astype(np.float16).reshape(-1).tobytes(),
                     'latents_256': lat256.tobytes(),
                     'latents_512': rng.standard_normal((4, 64, 64)).astype(np.float16).tobytes()})
    columns = {'caption': 'str', 'caption_latents': 'bytes', 'latents_256': 'bytes', 'latents_512': 'bytes'}
    return _write(tmp_path_factory.mktemp('micro') / 'train', columns, rows), stored


def test_micro_diffusion_latents_are_read_and_not_scaled_twice(micro_latents):
    from diffusion.models.latent_diffusion import LatentDiffusion
    from diffusion.schedules import DDPMSchedule
    local, stored = micro_latents
    batch = _first_batch(build_image_caption_dataloader(4, local=local, resolution=256, use_latents=True,
                                                        latents_scaled=True, shuffle=False))
    # the stored fp16 crosses to the device as it is; the model casts it there
    assert batch['latents'].shape == (4, 4, 32, 32) and batch['latents'].dtype == torch.float16
    torch.testing.assert_close(batch['latents'][2], torch.from_numpy(stored[2]))
    assert batch['latents_scaled'].all()
    assert batch['text_hidden'].shape == (4, 77, 8) and batch['text_mask'].shape == (4, 77)
    assert batch['caption'][0] == 'latent photo 0'
    # The model uses them as they are: no second multiplication by its scaling factor.
    model = LatentDiffusion(torch.nn.Identity(), DDPMSchedule(), scaling_factor=0.13025)
    torch.testing.assert_close(model.batch_latents(batch), batch['latents'].float())
    del batch['latents_scaled']
    torch.testing.assert_close(model.batch_latents(batch), batch['latents'].float() * 0.13025)  # our RAW convention
    big = StreamingImageCaptionDataset(local=local, resolution=512, use_latents=True, latents_scaled=True,
                                       batch_size=4).get_item(0)
    assert big['latents'].shape == (4, 64, 64)
    # Raw bytes say nothing of their scale: the setting is required.
    with pytest.raises(ValueError, match='latents_scaled'):
        StreamingImageCaptionDataset(local=local, resolution=256, use_latents=True, batch_size=4).get_item(0)
    gc.collect()


def test_center_crop_is_the_dataset_crop():
    """One centre crop: the helper evaluation and captioning use is the dataset's ``crop: center``."""
    from diffusion.data.dataset import _resize_crop
    from diffusion.data.precompute import prepare_image
    image = _photo(3)  # 60 x 64
    crop = center_crop(image, 32)
    assert np.array_equal(np.asarray(crop), np.asarray(_resize_crop(image, (32, 32), (0.5, 0.5))[0]))
    expected = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(prepare_image(image, 32), expected)
    assert center_crop(image).size == (60, 60)  # no size: the square's own side


def test_micro_diffusion_latents_train_with_composer(micro_latents):
    """A real (2-batch) Trainer.fit straight from micro_diffusion's latent shards, no re-conversion."""
    from composer import Trainer

    from diffusion.models.latent_diffusion import build_latent_diffusion
    local, _ = micro_latents
    torch.manual_seed(0)
    model = build_latent_diffusion(
        backbone={'name': 'unet', 'preset': 'mini-s', 'sample_size': 32, 'cross_attention_dim': 8,
                  'in_channels': 4, 'out_channels': 4},
        noise_schedule={'name': 'edm', 'sigma_data': 0.9}, scaling_factor=0.13025)
    spec = build_image_caption_dataloader(2, local=local, resolution=256, use_latents=True, latents_scaled=True)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = Trainer(model=model, train_dataloader=spec, max_duration='2ba', device='cpu', progress_bar=False,
                      optimizers=torch.optim.AdamW(model.backbone.parameters(), lr=1e-3))
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2
    assert any(not torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    trainer.close()
    gc.collect()
