"""The real CommonCatalog download path, offline: YFCC100M-format metadata -> ``convert/yfcc_filter.py`` ->
img2dataset (the real package) -> webdataset tars -> ``convert/images_to_mds.py`` -> a streaming dataset.

A local HTTP server on 127.0.0.1 (loopback only) plays Flickr: it serves a few hundred generated photos at
their original-size and standard-size URLs, with some photos missing at both, some broken (bytes that are not an
image) and some missing only at the original size, so that the fallback pass recovers them.
"""
from __future__ import annotations

import http.server
import io
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from convert_scripts import load_convert_script
from diffusion.data.licenses import in_license_set, normalize_license

N_ROWS = 240
# (YFCC licence name, licence URL), cycled over the rows: two commercial, two NC, two ND.
LICENSES = [('Attribution License', 'http://creativecommons.org/licenses/by/2.0/'),
            ('Attribution-ShareAlike License', 'http://creativecommons.org/licenses/by-sa/2.0/'),
            ('Attribution-NonCommercial License', 'http://creativecommons.org/licenses/by-nc/2.0/'),
            ('Attribution-NonCommercial-ShareAlike License', 'http://creativecommons.org/licenses/by-nc-sa/2.0/'),
            ('Attribution-NoDerivs License', 'http://creativecommons.org/licenses/by-nd/2.0/'),
            ('Attribution-NonCommercial-NoDerivs License', 'http://creativecommons.org/licenses/by-nc-nd/2.0/')]
ORIGINAL_SIZE, STANDARD_SIZE = (120, 90), (80, 60)


yfcc_filter = load_convert_script('yfcc_filter')
images_to_mds = load_convert_script('images_to_mds')


def _kind(i: int) -> str:
    """What the fake Flickr does with photo ``i``."""
    return {3: 'missing', 7: 'broken', 11: 'original_missing', 15: 'no_original_secret'}.get(i % 20, 'ok')


def _jpeg(i: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(i)
    base = rng.integers(0, 255, (1, 1, 3))
    array = np.clip(base + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='JPEG', quality=85)
    return buffer.getvalue()


class _Flickr(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header('Content-Type', 'image/jpeg')
        self.end_headers()
        if body is not None:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope='module')
def flickr():
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Flickr)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def _metadata(base: str) -> tuple[list[str], dict[str, dict]]:
    """YFCC100M dataset rows (25 tab-separated columns) and what each photo should become."""
    lines, truth, files = [], {}, {}
    for i in range(N_ROWS):
        photo_id, secret, original_secret = str(5_000_000 + i), f's{i:04x}', f'o{i:04x}'
        kind = _kind(i)
        license_name, license_url = LICENSES[i % len(LICENSES)]
        standard = f'/7/{photo_id}_{secret}.jpg'
        original = f'/7/{photo_id}_{original_secret}_o.jpg'
        if kind in ('ok', 'no_original_secret', 'original_missing'):
            files[standard] = _jpeg(i, STANDARD_SIZE)
        if kind == 'ok':
            files[original] = _jpeg(i, ORIGINAL_SIZE)
        if kind == 'broken':
            files[standard] = files[original] = b'<html>not an image</html>' * 4
        fields = [str(i), photo_id, 'hash', f'{i}@N00', f'user+{i}', '2010-01-01', '1262304000', 'Canon',
                  f'Photo+{i}+of+a+quiet+harbour', 'desc', 'sea', '', '', '', '', f'{base}/photos/{i}',
                  base + standard, license_name, license_url, '7', '1', secret,
                  '' if kind == 'no_original_secret' else original_secret, 'jpg', '0']
        lines.append('\t'.join(fields))
        truth[photo_id] = {'kind': kind, 'license': normalize_license(license_url), 'license_url': license_url,
                           'creator': f'user {i}', 'caption': f'Photo {i} of a quiet harbour'}
    _Flickr.files = files
    return lines, truth


def _download(url_list: Path, out: Path) -> None:
    """img2dataset, as a lab would run it on a yfcc_filter list (one process, few threads: a test)."""
    from img2dataset import download
    download(url_list=str(url_list), input_format='parquet', output_format='webdataset', output_folder=str(out),
             url_col='url', caption_col='caption', save_additional_columns=list(yfcc_filter.ADDITIONAL_COLUMNS),
             processes_count=1, thread_count=8, number_sample_per_shard=64, resize_mode='no', skip_reencode=True,
             extract_exif=False, timeout=5, retries=0, disallowed_header_directives=[], enable_wandb=False)


def test_yfcc_img2dataset_to_streaming(flickr, tmp_path, monkeypatch):
    from streaming import StreamingDataset

    from diffusion.data.dataset import shm_prefix_lock

    monkeypatch.setenv('NO_ALBUMENTATIONS_UPDATE', '1')  # albumentations' import would ask PyPI
    for name in ('no_proxy', 'NO_PROXY'):
        monkeypatch.setenv(name, '127.0.0.1,localhost')
    lines, truth = _metadata(flickr)
    metadata = tmp_path / 'yfcc100m_dataset'
    metadata.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    listed = yfcc_filter.main(['--metadata', str(metadata), '--out', str(tmp_path / 'cc.parquet'),
                               '--license-set', 'noncommercial'])
    expected_listed = {p for p, t in truth.items() if in_license_set(t['license'], 'noncommercial')}
    assert listed['kept'] == len(expected_listed) and listed['dropped'] == {'license_nd': N_ROWS - len(expected_listed)}

    _download(tmp_path / 'cc.parquet', tmp_path / 'shards' / 'pass1')
    retry = yfcc_filter.main(['--retry-from', str(tmp_path / 'shards' / 'pass1'), '--out', str(tmp_path / 'retry.parquet')])
    failed_first = {p for p in expected_listed if truth[p]['kind'] in ('missing', 'broken', 'original_missing')}
    assert retry['failed'] == len(failed_first)
    assert {r['photo_id'] for r in pq.read_table(tmp_path / 'retry.parquet').to_pylist()} == failed_first
    _download(tmp_path / 'retry.parquet', tmp_path / 'shards' / 'pass2')

    out = tmp_path / 'mds'
    report = images_to_mds.main(['--src', str(tmp_path / 'shards'), '--out', str(out), '--min-size', '16',
                                 '--eval-fraction', '0', '--license-set', 'noncommercial', '--source', 'yfcc'])
    stored_expected = {p for p in expected_listed if truth[p]['kind'] not in ('missing', 'broken')}
    n_missing = sum(truth[p]['kind'] == 'missing' for p in expected_listed)
    n_broken = sum(truth[p]['kind'] == 'broken' for p in expected_listed)
    assert report['skipped_by_reason'] == {'img2dataset_failed_to_download': n_missing,
                                           'img2dataset_failed_to_resize': n_broken}
    assert report['kept'] == len(stored_expected)

    with shm_prefix_lock():
        dataset = StreamingDataset(local=str(out), split='train', shuffle=False, batch_size=1)
    rows = [dataset[i] for i in range(len(dataset))]
    assert {r['key'] for r in rows} == stored_expected  # failures: counted, none stored
    for row in rows:
        want = truth[row['key']]
        assert (row['license'], row['license_url'], row['creator']) == (
            want['license'], want['license_url'], want['creator'])
        assert row['caption'] == want['caption']
        # the original size where Flickr had it, the standard size from the fallback pass otherwise
        assert (row['width'], row['height']) == (ORIGINAL_SIZE if want['kind'] == 'ok' else STANDARD_SIZE)
        assert row['image'].size == (row['width'], row['height'])
    stored_nc = {r['key'] for r in rows if 'NC' in r['license']}
    assert stored_nc and stored_nc == {p for p in stored_expected if 'NC' in truth[p]['license']}
    assert not any('ND' in r['license'] for r in rows)

    commercial = images_to_mds.main(['--src', str(tmp_path / 'shards'), '--out', str(tmp_path / 'mds_c'),
                                     '--min-size', '16', '--eval-fraction', '0', '--license-set', 'commercial'])
    assert commercial['kept'] == len(stored_expected) - len(stored_nc)
    assert commercial['skipped_by_reason']['license_excluded_by-nc'] > 0
    assert os.path.exists(out / 'attribution.csv')
