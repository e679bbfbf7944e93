"""A tiny real-photo MDS dataset built from images that installed Python packages ship.

scikit-image (``skimage/data``), scikit-learn (``sklearn/datasets/images``) and matplotlib
(``mpl-data/sample_data/grace_hopper.jpg``) ship 24 real photographs between them. Their hand-written
captions, licences and credits live in ``photos.json`` next to this file. The set exists so that
a first training run has real images and captions before the CommonCatalog mini set is built.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from diffusion.data.licenses import normalize_license
from diffusion.data.sanitize import sanitize_image
from diffusion.data.writer import DatasetWriter, columns_for, make_sample

log = logging.getLogger(__name__)

DEMO_JSON = Path(__file__).with_name('photos.json')
_PACKAGE_DIRS = {  # package -> (importable name, folder of the images inside it)
    'skimage': ('skimage', 'data'),
    'sklearn': ('sklearn', 'datasets/images'),
    'matplotlib': ('matplotlib', 'mpl-data/sample_data'),
}


def _package_file(package: str, name: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    module, folder = _PACKAGE_DIRS[package]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f'package {module!r} is not installed (pip install {module}); '
                                f'it ships the demo photo {name}')
    return Path(list(spec.submodule_search_locations)[0]) / folder / name


def demo_photo_entries() -> list[dict[str, Any]]:
    """The entries of ``photos.json`` (name, package, file, split, caption, license, creator)."""
    return json.loads(DEMO_JSON.read_text(encoding='utf-8'))['photos']


def build_demo_photos(out_dir: str | Path, max_side: int = 256, image_format: str = 'jpeg',
                      quality: int = 90) -> Path:
    """Build (or finish building) the demo-photo MDS dataset with ``train`` and ``eval`` splits.

    Args:
        out_dir: Output folder; ``out_dir/train`` and ``out_dir/eval`` receive MDS shards. A folder
            already holding the finished set is returned as is.
        max_side: Longer side of the stored images in pixels.
        image_format: ``jpeg`` or ``png``.
        quality: JPEG quality.

    Returns:
        ``out_dir`` as a Path; open it with ``StreamingImageCaptionDataset(local=out_dir, split=...)``.
    """
    out = Path(out_dir)
    config = {'builder': 'demo_photos', 'max_side': max_side, 'image_format': image_format,
              'quality': quality}
    with DatasetWriter(out, columns_for(image_format), config=config, commit_every=1000) as writer:
        for entry in demo_photo_entries():
            key = f'demo/{entry["name"]}'
            if writer.done(key):
                continue
            path = _package_file(entry['package'], entry['file'])
            clean = sanitize_image(path.read_bytes(), min_size=32, max_side=max_side)
            sample = make_sample(clean, key=key, caption=entry['caption'], caption_source='human',
                                 license_id=normalize_license(entry['license']), creator=entry['creator'],
                                 source=entry['package'], source_path=f'{entry["package"]}:{entry["file"]}',
                                 image_format=image_format, quality=quality)
            writer.write(sample, split=entry['split'])
    log.info('demo photos in %s', out)
    return out
