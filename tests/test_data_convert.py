"""Conversion to MDS: licences, the sanitising function on every bad-input kind, the converters,
the mini catalog from the real packages, and resume after a hard kill."""
from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from streaming.base.format import reader_from_json

from convert_scripts import load_convert_script
from diffusion.data.licenses import in_license_set, normalize_license
from diffusion.data.sanitize import SkipSample, clean_caption, is_weak_caption, sanitize_image
from diffusion.data.writer import CRASH_ENV, DatasetWriter

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get('DIFFUSION_DATA_CACHE', REPO / 'data' / 'cache'))


images_to_mds = load_convert_script('images_to_mds')
commoncatalog_mini = load_convert_script('commoncatalog_mini')
yfcc_filter = load_convert_script('yfcc_filter')


def read_split(out: Path, split: str = 'train') -> list[dict]:
    """Every row of an MDS split, read with streaming's own shard readers."""
    index = json.loads((out / split / 'index.json').read_text())
    rows = []
    for info in index['shards']:
        shard = reader_from_json(str(out / split), None, info)
        rows.extend(shard[i] for i in range(shard.samples))
    return rows


# ---------------------------------------------------------------------------------------------
# Fixture files for each bad-input kind, written by the test
# ---------------------------------------------------------------------------------------------
def _photo(seed: int, size=(96, 80), mode='RGB') -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (with a correct CRC) claims ``width`` x ``height``."""
    data = bytearray(_save(Image.new('RGB', (1, 1)), 'PNG'))
    ihdr = struct.pack('>II', width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack('>I', zlib.crc32(b'IHDR' + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _exif_rotated() -> bytes:
    """A 96x64 JPEG whose EXIF orientation 6 says: rotate 90 degrees clockwise to view."""
    image = _photo(7, (96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(image, 'JPEG', exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    image = Image.new('P', (80, 80), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 40, 80))
    return _save(image, 'PNG', transparency=0)  # index 0 (black) is transparent


GOOD = {f'good{i}': _save(_photo(i), 'JPEG') for i in range(4)}
BAD = {  # file bytes -> expected skip reason
    'zero': (b'', 'empty_file'),
    'notimage': (b'this is a text file, not an image\n' * 4, 'not_an_image'),
    'corrupt': (b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 4, 'corrupt'),
    'truncated': (_save(_photo(9, (128, 128)), 'JPEG')[:1500], 'truncated'),
    'bomb': (_png_claiming(30_000, 30_000), 'decompression_bomb'),
    'tiny': (_save(_photo(3, (20, 20)), 'PNG'), 'too_small'),
}
CONVERTED = {  # odd modes that must convert to RGB and be kept
    'cmyk': _save(_photo(4).convert('CMYK'), 'JPEG'),
    'sixteen': _save(Image.fromarray((np.arange(96 * 80, dtype=np.uint16).reshape(80, 96) * 8)), 'PNG'),
    'palette': _palette_with_transparency(),
    'la': _save(_photo(5, mode='L').convert('LA'), 'PNG'),
    'rgba': _save(_photo(6).convert('RGBA'), 'PNG'),
    'exif': _exif_rotated(),
}


@pytest.mark.parametrize('name', sorted(BAD))
def test_sanitize_rejects_bad_input(name):
    data, reason = BAD[name]
    with pytest.raises(SkipSample) as err:
        sanitize_image(data, min_size=32)
    assert err.value.reason == reason


def test_sanitize_converts_modes_and_orientation():
    for name, data in CONVERTED.items():
        clean = sanitize_image(data, min_size=32)
        assert clean.image.mode == 'RGB', name
    assert Image.open(io.BytesIO(CONVERTED['sixteen'])).mode.startswith('I')
    exif = sanitize_image(CONVERTED['exif'], min_size=32)
    assert (exif.width, exif.height) == (64, 96)  # upright: rotated from 96x64
    palette = np.asarray(sanitize_image(CONVERTED['palette'], min_size=32).image)
    assert tuple(palette[10, 10]) == (255, 0, 0) and tuple(palette[10, 70]) == (255, 255, 255)
    sixteen = np.asarray(sanitize_image(CONVERTED['sixteen'], min_size=32).image)
    assert sixteen.max() > 200 and sixteen.min() == 0  # scaled from 16 bits, not clipped to 255
    big = sanitize_image(GOOD['good0'], min_size=32, max_side=48)
    assert max(big.image.size) == 48 and (big.width, big.height) == (96, 80)


SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20" viewBox="0 0 40 20">'
       b'<rect x="0" y="0" width="20" height="20" fill="#ff0000" fill-opacity="0.5"/></svg>')


def test_sanitize_renders_svg_straight_to_rgb():
    """The direct cairo rendering equals cairosvg's PNG composited onto the background (to rounding)."""
    import cairosvg
    svgs = [SVG, *[p.read_bytes() for p in sorted((CACHE / 'npm').glob('openmoji-*/**/color/svg/*.svg'))[:8]]]
    assert len(svgs) == 9, "the OpenMoji npm package is not in the cache"
    for data in svgs:
        png = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data, output_width=64))).convert('RGBA')
        expected = Image.alpha_composite(Image.new('RGBA', png.size, (255, 255, 255, 255)), png).convert('RGB')
        clean = sanitize_image(data, svg=True, min_size=16, max_side=64)
        assert clean.image.mode == 'RGB' and clean.image.size == expected.size
        diff = np.abs(np.asarray(clean.image, np.int16) - np.asarray(expected, np.int16))
        assert diff.max() <= 1
    pixels = np.asarray(sanitize_image(SVG, svg=True, min_size=16, max_side=64, background=(0, 0, 255)).image)
    assert pixels.shape == (32, 64, 3)
    assert tuple(pixels[5, 5]) in {(127, 0, 128), (128, 0, 127), (128, 0, 128), (127, 0, 127)}  # half red on blue
    assert tuple(pixels[5, 50]) == (0, 0, 255)  # the background where nothing is drawn
    for bad in (b'<svg', b'<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"></svg>'):
        with pytest.raises(SkipSample) as err:
            sanitize_image(bad, svg=True, min_size=16, max_side=64)
        assert err.value.reason in {'corrupt', 'too_small'}
    with pytest.raises(SkipSample) as err:
        sanitize_image(SVG, svg=True, max_side=4000, max_pixels=1000)
    assert err.value.reason == 'decompression_bomb'


def test_captions():
    assert clean_caption(b'  a red\n bicycle  ') == 'a red bicycle'
    for raw, reason in ((b'caf\xe9 \xff', 'caption_not_utf8'), (b'   ', 'empty_caption'), (None, 'empty_caption')):
        with pytest.raises(SkipSample) as err:
            clean_caption(raw)
        assert err.value.reason == reason
    for weak in ('SVG Gradient Collection', 'IMG_1234', 'dog.png', 'x', 'Clipart by Nicu Buculei - arrow08_4'):
        assert is_weak_caption(weak), weak
    for good in ('A red bicycle leaning on a wall', '2 dead frogs', 'grinning face'):
        assert not is_weak_caption(good), good


def test_licenses():
    cases = {
        'CC BY-SA 4.0': 'CC-BY-SA-4.0', 'https://creativecommons.org/licenses/by/2.0/': 'CC-BY-2.0',
        'Attribution-NonCommercial-ShareAlike License': 'CC-BY-NC-SA',
        'http://creativecommons.org/licenses/by-nd/2.0/': 'CC-BY-ND-2.0',
        'http://web.resource.org/cc/PublicDomain': 'public-domain', 'CC0': 'CC0-1.0',
        'http://creativecommons.org/licenses/GPL/2.0/': 'GPL-2.0', 'GPL-2': 'GPL-2.0',
        'All Rights Reserved': 'all-rights-reserved',
    }
    for text, expected in cases.items():
        assert normalize_license(text) == expected, text
    table = {'CC-BY-4.0': (1, 1, 1), 'CC-BY-SA-4.0': (1, 1, 1), 'CC0-1.0': (1, 1, 1), 'public-domain': (1, 1, 1),
             'CC-BY-NC-2.0': (0, 1, 1), 'CC-BY-NC-SA-2.0': (0, 1, 1), 'CC-BY-ND-2.0': (0, 0, 0),
             'CC-BY-NC-ND-4.0': (0, 0, 0), 'GPL-2.0': (0, 0, 1), 'unknown': (0, 0, 0),
             'all-rights-reserved': (0, 0, 0)}
    for license_id, expected in table.items():
        got = tuple(int(in_license_set(license_id, s)) for s in ('commercial', 'noncommercial', 'all'))
        assert got == expected, license_id


# ---------------------------------------------------------------------------------------------
# images_to_mds over a folder holding every bad-input kind
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def messy_folder(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp('messy')
    for name, data in {**GOOD, **CONVERTED, **{k: v[0] for k, v in BAD.items()}}.items():
        suffix = '.png' if data[:4] == b'\x89PNG' else '.jpg'
        (src / f'{name}{suffix}').write_bytes(data)
        (src / f'{name}.txt').write_text(f'a test picture called {name}')
    (src / 'zdupe.jpg').write_bytes(GOOD['good1'])  # exact duplicate of good1, listed after it
    (src / 'zdupe.txt').write_text('the same picture again')
    (src / 'latin1.jpg').write_bytes(_save(_photo(11), 'JPEG'))
    (src / 'latin1.txt').write_bytes(b'caf\xe9 au lait')  # not UTF-8
    (src / 'nocap.jpg').write_bytes(_save(_photo(12), 'JPEG'))
    (src / 'nocap.txt').write_text('   ')
    (src / 'meta.jpg').write_bytes(_save(_photo(13), 'JPEG'))
    (src / 'meta.json').write_text(json.dumps({'caption': 'a picture with json metadata', 'creator': 'Ada',
                                               'license': 'CC BY 4.0'}))
    return src


def test_images_to_mds_counts_every_reason(messy_folder, tmp_path):
    out = tmp_path / 'out'
    # Two worker processes, through the real CLI in its own process: forking this test process, which has run
    # torch's thread pools, could deadlock the children (fork-after-threads), which no user process does.
    proc = subprocess.run([sys.executable, str(REPO / 'convert' / 'images_to_mds.py'), '--src', str(messy_folder),
                           '--out', str(out), '--min-size', '32', '--eval-fraction', '0', '--workers', '2',
                           '--commit-every', '5'], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'kept' in proc.stdout  # the summary a user sees
    report = json.loads((out / 'report.json').read_text())
    expected = {reason for _, reason in BAD.values()} | {'duplicate', 'caption_not_utf8', 'empty_caption'}
    assert report['skipped_by_reason'] == {r: 1 for r in expected}
    rows = read_split(out)
    keys = [r['key'] for r in rows]
    assert sorted(keys) == sorted([*GOOD, *CONVERTED, 'meta'])
    by_key = {r['key']: r for r in rows}
    assert (by_key['exif']['width'], by_key['exif']['height']) == (64, 96)
    assert by_key['meta']['creator'] == 'Ada' and by_key['meta']['license'] == 'CC-BY-4.0'
    assert all(Image.open(io.BytesIO(r['image'])).mode == 'RGB' for r in rows) if isinstance(
        rows[0]['image'], bytes) else all(r['image'].mode == 'RGB' for r in rows)
    saved = json.loads((out / 'report.json').read_text())
    assert saved['kept'] == len(rows) and saved['skipped'] == len(expected)
    with open(out / 'attribution.csv', encoding='utf-8') as f:
        assert sorted(row['key'] for row in csv.DictReader(f)) == sorted(keys)


def test_manifest_and_tar_sources(tmp_path):
    table = pa.table({'image': [_save(_photo(i), 'PNG') for i in range(3)],
                      'caption': ['first photo here', 'second photo here', 'third photo here'],
                      'key': ['a', 'b', 'c'], 'license': ['CC-BY-4.0', 'CC-BY-NC-4.0', 'CC-BY-ND-4.0']})
    pq.write_table(table, tmp_path / 'manifest.parquet')
    out = tmp_path / 'from_parquet'
    report = images_to_mds.main(['--src', str(tmp_path / 'manifest.parquet'), '--out', str(out), '--min-size', '32',
                                 '--eval-fraction', '0', '--license-set', 'commercial'])
    assert [r['key'] for r in read_split(out)] == ['a']
    assert report['skipped_by_reason'] == {'license_excluded_by-nc': 1, 'license_excluded_nd': 1}

    shard = tmp_path / 'wds' / '00000.tar'
    shard.parent.mkdir()
    with tarfile.open(shard, 'w') as tar:
        for i in range(3):
            for ext, data in (('jpg', _save(_photo(20 + i), 'JPEG')), ('txt', f'tar photo number {i}'.encode()),
                              ('json', json.dumps({'url': f'http://x/{i}.jpg'}).encode())):
                info = tarfile.TarInfo(f'{i:09d}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / 'from_tar'
    images_to_mds.main(['--src', str(shard.parent), '--out', str(out), '--min-size', '32', '--eval-fraction', '0',
                        '--image-format', 'png'])
    rows = read_split(out)
    assert [r['caption'] for r in rows] == [f'tar photo number {i}' for i in range(3)]
    shard = json.loads((out / 'train' / 'index.json').read_text())['shards'][0]
    assert dict(zip(shard['column_names'], shard['column_encodings']))['image'] == 'png'


# ---------------------------------------------------------------------------------------------
# Resume after a hard kill (SIGKILL from inside the writer, after N samples)
# ---------------------------------------------------------------------------------------------
def test_killed_conversion_resumes_without_loss_or_duplicates(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    for i in range(30):
        (src / f'img{i:02d}.png').write_bytes(_save(_photo(100 + i, (48, 40)), 'PNG'))
        (src / f'img{i:02d}.txt').write_text(f'synthetic picture number {i}')
    out = tmp_path / 'out'
    args = ['--src', str(src), '--out', str(out), '--min-size', '32', '--commit-every', '4', '--eval-fraction', '0.2']
    env = dict(os.environ, **{CRASH_ENV: '11'}, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / 'convert' / 'images_to_mds.py'), *args], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]  # killed mid-run by SIGKILL
    committed = read_split(out, 'train') + read_split(out, 'eval')
    assert 0 < len(committed) < 30  # readers see only the committed parts, never a broken index
    assert not (out / 'report.json').exists()

    images_to_mds.main(args)  # same arguments: resume
    rows = read_split(out, 'train') + read_split(out, 'eval')
    keys = [r['key'] for r in rows]
    assert len(keys) == len(set(keys)) == 30
    assert sorted(keys) == [f'img{i:02d}' for i in range(30)]
    with pytest.raises(SystemExit, match=r'--eval-fraction 0.2 \(now --eval-fraction 0.5\).*--overwrite'):
        images_to_mds.main([*args[:-1], '0.5'])


def test_writer_refuses_missing_columns(tmp_path):
    with DatasetWriter(tmp_path / 'w') as writer:
        with pytest.raises(ValueError, match='lacks columns'):
            writer.write({'key': 'x', 'caption': 'y'})


# ---------------------------------------------------------------------------------------------
# The mini catalog from the real packages (downloads once into the cache)
# ---------------------------------------------------------------------------------------------
# npm and Debian packages the test reads; `make test` (and `make demo`) fetch them into data/cache first, so the
# test itself never downloads.
CATALOG_PACKAGES = (CACHE / 'npm' / 'openmoji-17.0.0', CACHE / 'npm' / 'emoji-datasource-twitter-16.0.0',
                    CACHE / 'deb' / 'openclipart-svg')


@pytest.mark.network
def test_commoncatalog_mini_commercial(tmp_path):
    missing = [str(p) for p in CATALOG_PACKAGES if not p.exists()]
    if missing and os.environ.get('DIFFUSION_ALLOW_DOWNLOADS') != '1':
        pytest.fail(f'the package cache lacks {missing}: `make test` fetches them before the suite (or set '
                    'DIFFUSION_ALLOW_DOWNLOADS=1 to let this test run npm pack / apt-get download)')
    out = tmp_path / 'cc'
    # Include the OpenClipart drawings CC's old GPL deed covers and a duplicated frog, plus a few others.
    include = r'^(openmoji|twemoji)/|denco|2_dead_frogs|^openclipart/animals/a'
    report = commoncatalog_mini.main(['--out', str(out), '--cache-dir', str(CACHE), '--max-per-source', '10',
                                      '--include', include, '--size', '64', '--workers', '1', '--eval-fraction', '0.2'])
    rows = read_split(out, 'train') + read_split(out, 'eval')
    assert {r['source'] for r in rows} == {'openmoji', 'twemoji', 'openclipart'}
    assert all(in_license_set(r['license'], 'commercial') for r in rows)
    assert report['by_source']['openclipart']['skipped'].get('license_excluded_gpl', 0) >= 1
    assert report['skipped_by_reason'].get('duplicate', 0) >= 1  # animals/ and animals/amphibian/ frog
    assert {r['license'] for r in rows if r['source'] == 'openmoji'} == {'CC-BY-SA-4.0'}
    assert {r['license'] for r in rows if r['source'] == 'twemoji'} == {'CC-BY-4.0'}
    assert all(r['creator'] and r['license_url'].startswith('https://') for r in rows)
    assert all(max(r['image'].size) <= 64 for r in rows)
    with open(out / 'attribution.csv', encoding='utf-8') as f:
        attribution = {row['key']: row for row in csv.DictReader(f)}
    assert set(attribution) == {r['key'] for r in rows}
    assert all(attribution[r['key']]['creator'] == r['creator'] for r in rows)
    assert {'train', 'eval'} <= set(report['splits'])


# ---------------------------------------------------------------------------------------------
# YFCC100M metadata filter
# ---------------------------------------------------------------------------------------------
def _yfcc_row(i: int, license_name: str, license_url: str, marker: str = '0', tags: str = '') -> str:
    fields = [str(i), str(1000 + i), 'hash', '12345@N00', 'some+user', '2010-01-01', '1262304000', 'Canon',
              f'Photo+number+{i}', 'A+nice+view', 'sky,sea', tags, '', '', '', f'http://flickr.com/p/{i}',
              f'http://farm1.staticflickr.com/{i}.jpg', license_name, license_url, '1', '1', 's', 'so', 'jpg', marker]
    return '\t'.join(fields)


def test_yfcc_filter(tmp_path):
    rows = [
        _yfcc_row(1, 'Attribution License', 'http://creativecommons.org/licenses/by/2.0/',
                  tags='exif:width=1024,exif:height=768'),
        _yfcc_row(2, 'Attribution-ShareAlike License', 'http://creativecommons.org/licenses/by-sa/2.0/'),
        _yfcc_row(3, 'Attribution-NonCommercial License', 'http://creativecommons.org/licenses/by-nc/2.0/'),
        _yfcc_row(4, 'Attribution-NoDerivs License', 'http://creativecommons.org/licenses/by-nd/2.0/'),
        _yfcc_row(5, 'Attribution-NonCommercial-NoDerivs License', 'http://creativecommons.org/licenses/by-nc-nd/2.0/'),
        _yfcc_row(6, 'Attribution License', 'http://creativecommons.org/licenses/by/2.0/', marker='1'),
        _yfcc_row(7, 'All Rights Reserved', ''),
    ]
    metadata = tmp_path / 'yfcc100m_dataset'
    metadata.write_text('\n'.join(rows) + '\n', encoding='utf-8')
    out = tmp_path / 'list.parquet'
    report = yfcc_filter.main(['--metadata', str(metadata), '--out', str(out), '--license-set', 'noncommercial',
                               '--split-sets'])
    table = pq.read_table(out).to_pylist()
    assert [r['photo_id'] for r in table] == ['1001', '1002', '1003']
    assert table[0]['caption'] == 'Photo number 1' and table[0]['creator'] == 'some user'
    # the original-size URL first (secret_original + extension), the standard one as fallback
    assert table[0]['url'] == 'http://farm1.staticflickr.com/1001_so_o.jpg'
    assert table[0]['fallback_url'] == 'http://farm1.staticflickr.com/1.jpg'
    assert table[0]['license'] == 'CC-BY-2.0' and table[0]['license_url'].endswith('/by/2.0/')
    assert (table[0]['width'], table[0]['height']) == (1024, 768)
    assert report['dropped'] == {'license_nd': 2, 'video': 1, 'license_all-rights-reserved': 1}
    assert [r['photo_id'] for r in pq.read_table(tmp_path / 'list.commercial.parquet').to_pylist()] == ['1001', '1002']
    assert [r['photo_id'] for r in pq.read_table(tmp_path / 'list.noncommercial.parquet').to_pylist()] == ['1003']
    small = yfcc_filter.main(['--metadata', str(metadata), '--out', str(tmp_path / 'min.csv'),
                              '--license-set', 'commercial', '--min-size', '512'])
    assert small['kept'] == 1 and small['dropped']['size_unknown'] == 1
