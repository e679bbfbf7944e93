"""The own-data route end to end, as docs/own-data.md has a user run it: `make demo DEMO_ARGS="--data my_folder"`
(here ``scripts/demo.py --data``) on a folder of 24 real photos with x.txt captions, at the smallest sizes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from streaming.base.format import reader_from_json

pytestmark = pytest.mark.integration  # processes of its own or a whole pipeline: pytest -m "not integration" skips it

REPO = Path(__file__).resolve().parents[1]
DEMO_PHOTOS = REPO / 'data' / 'demo_photos'


def photo_folder(folder: Path) -> Path:
    """The demo photos (real photographs shipped by installed packages) as a user's folder: x.jpg + x.txt."""
    if not (DEMO_PHOTOS / 'eval' / 'index.json').exists():
        from diffusion.demo.photos import build_demo_photos
        build_demo_photos(DEMO_PHOTOS)
    folder.mkdir(parents=True)
    for split in ('train', 'eval'):
        for info in json.loads((DEMO_PHOTOS / split / 'index.json').read_text())['shards']:
            shard = reader_from_json(str(DEMO_PHOTOS / split), None, info)
            for i in range(shard.samples):
                row = shard.get_item(i)
                stem = row['key'].replace('/', '_')
                row['image'].convert('RGB').save(folder / f'{stem}.jpg', quality=90)
                (folder / f'{stem}.txt').write_text(row['caption'], encoding='utf-8')
    return folder


def test_own_folder_trains_evaluates_and_exports(tmp_path, monkeypatch):
    folder = photo_folder(tmp_path / 'my_photos')
    assert len(list(folder.glob('*.jpg'))) == 24
    cmd = [sys.executable, 'scripts/demo.py', '--data', str(folder), '--root', str(tmp_path), '--license',
           'CC-BY-4.0', '--creator', 'Test Photographer', '--autoencoder-steps', '2', '--unet-steps', '2',
           '--checkpoints', '1', '--sample-steps', '2']
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data, out = tmp_path / 'data' / 'my_photos', tmp_path / 'outputs' / 'my_photos'
    report = json.loads((data / 'mds' / 'report.json').read_text())
    assert report['kept'] == 24 and report['splits']['eval'] >= 1
    for done in (out / 'autoencoder' / 'vae' / 'config.json', data / 'latents' / 'latents.json',
                 out / 'unet' / 'checkpoints' / 'summary.json', out / 'eval' / 'results.json',
                 out / 'pipeline' / 'model_index.json'):
        assert done.exists(), done
    # The run is named for the data, and samples the held-out captions, not the emoji prompts.
    config = (out / 'unet' / 'checkpoints' / 'config.yaml').read_text()
    assert 'my_photos-unet' in config and 'grinning face' not in config
    with open(data / 'mds' / 'attribution.csv', encoding='utf-8') as f:
        held_out = [row['key'] for row in csv.DictReader(f) if row['split'] == 'eval']
    results = json.loads((out / 'eval' / 'results.json').read_text())
    assert results['reference']['num_images'] == len(held_out)
    card = (out / 'pipeline' / 'README.md').read_text()
    assert 'CC-BY-4.0: 24' in card and 'Test Photographer: 24' in card
    assert 'Test Photographer' in (out / 'pipeline' / 'attribution.csv').read_text()
    assert 'own-data demo summary' in result.stdout

    # The Python line the summary prints opens the export and writes an image, as printed (run in this process).
    assert f'try prompts: python -m diffusion.app {out}/pipeline' in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith('in Python: python -c "'))
    code = line[len('in Python: python -c "'):-1]
    monkeypatch.chdir(tmp_path)
    exec(code.replace("height=64, width=64)", "height=64, width=64, num_inference_steps=2)"), {})
    from PIL import Image
    assert Image.open(tmp_path / 'x.png').size == (64, 64)
