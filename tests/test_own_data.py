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
    # The default model: the MicroDiT with flow matching, exported natively (the UNet's route: the test below).
    cmd = [sys.executable, 'scripts/demo.py', '--data', str(folder), '--root', str(tmp_path), '--license',
           'CC-BY-4.0', '--creator', 'Test Photographer', '--autoencoder-steps', '2', '--microdit-flow-steps', '2',
           '--checkpoints', '1', '--sample-steps', '2']
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data, out = tmp_path / 'data' / 'my_photos', tmp_path / 'outputs' / 'my_photos'
    report = json.loads((data / 'mds' / 'report.json').read_text())
    assert report['kept'] == 24 and report['splits']['eval'] >= 1
    exports = {'microdit-flow': out / 'microdit-flow' / 'export'}
    for done in (out / 'autoencoder' / 'vae' / 'config.json', data / 'latents' / 'latents.json',
                 exports['microdit-flow'] / 'config.json'):
        assert done.exists(), done
    with open(data / 'mds' / 'attribution.csv', encoding='utf-8') as f:
        held_out = [row['key'] for row in csv.DictReader(f) if row['split'] == 'eval']
    monkeypatch.chdir(tmp_path)
    from PIL import Image
    for model, export in exports.items():
        # The run is named for the data, and samples the held-out captions, not the emoji prompts.
        config = (out / model / 'checkpoints' / 'config.yaml').read_text()
        assert f'my_photos-{model}' in config and 'grinning face' not in config
        results = json.loads((out / model / 'eval' / 'results.json').read_text())
        assert results['reference']['num_images'] == len(held_out)
        assert [row['guidance_scale'] for row in results['results']] == [3.0]
        card = (export / 'README.md').read_text()
        assert 'CC-BY-4.0: 24' in card and 'Test Photographer: 24' in card and f'--models {model}' in card
        assert 'Test Photographer' in (export / 'attribution.csv').read_text()

        # The Python line the summary prints opens the export and writes an image, as printed (run in this process).
        assert f'try prompts: python -m diffusion.app {export}' in result.stdout
        line = next(x for x in result.stdout.splitlines()
                    if x.startswith('in Python: python -c "') and str(export) in x)
        code = line[len('in Python: python -c "'):-1]
        exec(code.replace("height=64, width=64)", "height=64, width=64, num_inference_steps=2)"), {})
        assert Image.open(tmp_path / 'x.png').size == (64, 64)
        (tmp_path / 'x.png').unlink()
    assert 'own-data demo summary' in result.stdout
    assert json.loads((exports['microdit-flow'] / 'config.json').read_text())['generation']['sampler'] == 'euler'


def test_own_data_unet_route_exports_a_diffusers_pipeline(tmp_path, monkeypatch):
    """``--models unet``: the stages the route builds for the UNet are the demo's (its recipe with a constant lr,
    DDIM at guidance 3), and its export a diffusers pipeline. Only the conversion runs here (the held-out captions
    come from it); the commands after it are checked as built: running them is the test above's, for the default
    model, and the UNet's recipe, evaluation and diffusers export run in tests of their own."""
    sys.path.insert(0, str(REPO / 'scripts'))
    import demo
    from diffusion.demo.own_data import own_data_stages, own_paths
    folder = photo_folder(tmp_path / 'my_photos')
    args = demo.parse_args(['--data', str(folder), '--root', str(tmp_path), '--license', 'CC-BY-4.0',
                            '--models', 'unet', '--unet-steps', '2', '--checkpoints', '1', '--sample-steps', '2',
                            '--autoencoder-steps', '2'])
    ran = {}

    clears = {}

    def record(name, cmd, done, force, logs, clear=None):  # runs the conversion only: the rest is checked as built
        ran[name], clears[name] = cmd, clear
        return demo.step(name, cmd, done, force, logs, clear) if name == 'convert' else 0.0
    from diffusion.demo import own_data
    cards = []
    monkeypatch.setattr(own_data, 'write_own_model_card', lambda folder, *a: cards.append(folder))
    own_data_stages(args, REPO, sys.executable, record)
    root = own_paths(args)['root']
    assert list(ran) == ['convert', 'autoencoder', 'latents', 'unet', 'eval-unet', 'export-unet']
    assert ran['unet'][2] == 'yamls/demo/unet.yaml' and 'scheduler.alpha_f=1.0' in ran['unet']
    assert 'run_name=my_photos-unet' in ran['unet'] and f'variables.out={root / "unet"}' in ran['unet']
    assert {'sampler=ddim', 'guidance_scales=[3.0]', 'num_inference_steps=2'} <= set(ran['eval-unet'])
    assert ran['export-unet'][1] == 'convert/export_diffusers.py'
    assert ran['export-unet'][-1] == str(root / 'unet' / 'pipeline')
    assert cards == [root / 'unet' / 'pipeline']
    # --force redoes every stage from an empty folder (nothing of an earlier run, e.g. another profile's later
    # checkpoints, is resumed or scored): the conversion here really starts again.
    mds = own_paths(args)['mds']
    (mds / 'stale.txt').write_text('from an earlier run')
    args.force = True
    own_data_stages(args, REPO, sys.executable, record)
    assert not (mds / 'stale.txt').exists() and (mds / 'report.json').exists()
    assert clears == {'convert': mds, 'autoencoder': root / 'autoencoder', 'latents': own_paths(args)['latents'],
                      'unet': root / 'unet', 'eval-unet': root / 'unet' / 'eval',
                      'export-unet': root / 'unet' / 'pipeline'}
