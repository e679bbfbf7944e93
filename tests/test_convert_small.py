"""convert/images_to_mds.py on small and odd inputs, as a newcomer meets them: a handful of images, images without
captions, broken files, a re-run with another option, a mistyped option (in every converter), a Hugging Face
``datasets`` folder."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert_scripts import load_convert_script

REPO = Path(__file__).resolve().parents[1]
images_to_mds = load_convert_script('images_to_mds')


def _jpeg(seed: int, size=(96, 80)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='JPEG')
    return buffer.getvalue()


def _folder(root: Path, n: int, captions: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f'photo{i}.jpg').write_bytes(_jpeg(i))
        if captions:
            (root / f'photo{i}.txt').write_text(f'a small test picture number {i}')
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / 'convert' / 'images_to_mds.py'), *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize('n', [2, 3, 7, 24])
def test_small_sets_hold_one_image_out(tmp_path, n):
    """At the default --eval-fraction (0.05) any set of 2+ images has an eval split, and a train split."""
    report = images_to_mds.main(['--src', str(_folder(tmp_path / 'src', n)), '--out', str(tmp_path / 'out')])
    assert report['kept'] == n
    assert report['splits'].get('eval', 0) >= 1 and report['splits'].get('train', 0) >= 1, report['splits']
    assert report['splits'].get('eval', 0) == max(1, round(n * 0.05)) or n * 0.05 >= 1


def test_one_image_says_there_is_no_eval(tmp_path, capsys):
    images_to_mds.main(['--src', str(_folder(tmp_path / 'src', 1)), '--out', str(tmp_path / 'out')])
    assert 'no eval split' in capsys.readouterr().out


def test_nothing_kept_exits_with_a_caption_hint(tmp_path):
    src = _folder(tmp_path / 'src', 3, captions=False)
    result = _cli('--src', str(src), '--out', str(tmp_path / 'out'))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert 'x.txt' in last and '--keep-empty-captions' in last and 'missing_caption' in last, result.stderr
    assert 'Traceback' not in result.stderr
    # The hint's way out works: kept, flagged weak.
    report = images_to_mds.main(['--src', str(src), '--out', str(tmp_path / 'kept'), '--keep-empty-captions'])
    assert report['kept'] == 3


def test_every_skipped_file_is_named_with_its_own_reason(tmp_path, capsys):
    src = _folder(tmp_path / 'src', 3)
    (src / 'nocaption.jpg').write_bytes(_jpeg(10))
    (src / 'blank.jpg').write_bytes(_jpeg(11))
    (src / 'blank.txt').write_text('   \n')
    (src / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    (src / 'broken_with_caption.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    (src / 'broken_with_caption.txt').write_text('a caption for a file that does not decode')
    out = tmp_path / 'out'
    report = images_to_mds.main(['--src', str(src), '--out', str(out)])
    saved = json.loads((out / 'report.json').read_text())
    named = {row['name']: row['reason'] for row in saved['skipped_files']}
    assert named == {'nocaption.jpg': 'missing_caption', 'blank.jpg': 'empty_caption', 'broken.jpg': 'truncated',
                     'broken_with_caption.png': 'truncated'}, named
    assert report['kept'] == 3 and report['splits'].get('eval') == 1  # held out among the images with captions
    lines = capsys.readouterr().out.splitlines()
    summary = lines[lines.index(next(x for x in lines if x.startswith('kept 3'))):][:6]
    for name, reason in named.items():
        assert any(name in line and reason in line for line in summary), (name, summary)


def test_rerun_with_another_option_is_one_line_naming_it(tmp_path):
    src, out = _folder(tmp_path / 'src', 4), tmp_path / 'out'
    images_to_mds.main(['--src', str(src), '--out', str(out), '--size', '64'])
    result = _cli('--src', str(src), '--out', str(out), '--size', '128')  # as a user runs it: exit status, stderr
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr and 'overwrite=True' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if 'error' in line]
    assert len(errors) == 1 and '--size 64' in errors[0] and '--size 128' in errors[0] and '--overwrite' in errors[0]
    assert images_to_mds.main(['--src', str(src), '--out', str(out), '--size', '128', '--overwrite'])['kept'] == 4


def test_abbreviated_options_are_refused(tmp_path):
    result = _cli('--src', str(_folder(tmp_path / 'src', 2)), '--out', str(tmp_path / 'out'), '--eval-frac', '0.5')
    assert result.returncode == 2 and '--eval-frac' in result.stderr, result.stderr



@pytest.mark.parametrize('script,argv,abbreviation', [
    ('caption', ['--src', 'in', '--out', 'out', '--commit', '4'], '--commit'),
    ('precompute_latents', ['--src', 'in', '--out', 'out', '--vae', 'v', '--text-encoder-p', 'x'],
     '--text-encoder-p'),
    ('export_diffusers', ['--checkpoint', 'c.pt', '--out', 'out', '--weight', 'ema'], '--weight'),
])
def test_other_converters_refuse_abbreviated_options(script, argv, abbreviation, capsys):
    with pytest.raises(SystemExit) as stop:
        load_convert_script(script).parse_args(argv)
    assert stop.value.code == 2 and abbreviation in capsys.readouterr().err


@pytest.mark.parametrize('main,argv,abbreviation', [
    (lambda argv: load_convert_script('yfcc_filter').main(argv), ['--metadata', 'm.bz2', '--out', 'o.csv', '--min',
                                                                    '5'], '--min'),
    (lambda argv: __import__('diffusion.export.native', fromlist=['main']).main(argv),
     ['--checkpoint', 'c.pt', '--out', 'out', '--weight', 'ema'], '--weight'),
])
def test_abbreviations_stop_before_any_work(main, argv, abbreviation, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and abbreviation in capsys.readouterr().err


def test_every_parser_refuses_abbreviations():
    """Every ``ArgumentParser`` of the project (converters, library CLIs, scripts, benches) is built with
    ``allow_abbrev=False``: ``--eval-fr`` is an error, not ``--eval-fraction``."""
    import ast
    lax = []
    folders = ('convert', 'diffusion', 'scripts', 'bench')
    for path in sorted([*REPO.glob('*.py'), *(p for f in folders for p in (REPO / f).rglob('*.py'))]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, 'attr', getattr(node.func, 'id', '')) == \
                    'ArgumentParser':
                strict = any(k.arg == 'allow_abbrev' and getattr(k.value, 'value', True) is False
                             for k in node.keywords)
                if not strict:
                    lax.append(f'{path.relative_to(REPO)}:{node.lineno}')
    assert lax == []

def _hf_dataset(n: int, first: int = 0):
    import datasets
    images = [Image.open(io.BytesIO(_jpeg(first + i))) for i in range(n)]
    return datasets.Dataset.from_dict({'image': images, 'text': [f'picture {i} of a test set' for i in range(n)]},
                                      features=datasets.Features({'image': datasets.Image(),
                                                                  'text': datasets.Value('string')}))


def test_hugging_face_datasets_folders_offline(tmp_path):
    """``save_to_disk`` of a Dataset and of a DatasetDict, and parquet files, read with pyarrow as --src."""
    import datasets
    ds = _hf_dataset(5)
    ds.save_to_disk(str(tmp_path / 'saved'))
    datasets.DatasetDict({'train': ds, 'test': _hf_dataset(2, first=100)}).save_to_disk(str(tmp_path / 'saved_dict'))
    (tmp_path / 'pq').mkdir()
    ds.to_parquet(str(tmp_path / 'pq' / 'train-00000.parquet'))
    arrow = next((tmp_path / 'saved').glob('*.arrow'))
    for src, kept in [('saved', 5), ('saved_dict', 7), ('pq', 5), (arrow, 5)]:
        out = tmp_path / f'out-{Path(src).name}'
        report = images_to_mds.main(['--src', str(tmp_path / src), '--out', str(out), '--min-size', '32'])
        assert report['kept'] == kept and report['skipped'] == 0, (src, report)
    rows = (tmp_path / 'out-saved_dict' / 'attribution.csv').read_text().splitlines()
    assert any(',test/' in row for row in rows) and any(',train/' in row for row in rows)
