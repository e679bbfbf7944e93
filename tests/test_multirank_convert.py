"""Conversion on many machines: four ranks as separate processes give the dataset one process gives; the rank
comes from the composer/torchrun or the Slurm array environment; the MDS row layout mds_rows parses is pinned
against streaming's own decoding."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streaming import StreamingDataset
from streaming.base.format import reader_from_json

from convert_scripts import load_convert_script

from diffusion.data.convert_args import rank_from_env
from diffusion.data.dataset import shm_prefix_lock
from diffusion.data.mds_rows import RowReader

pytestmark = pytest.mark.integration  # processes of its own or a whole pipeline: pytest -m "not integration" skips it

REPO = Path(__file__).resolve().parents[1]
images_to_mds = load_convert_script('images_to_mds')
N_SHARDS, PER_SHARD = 7, 12
LICENSES = ['CC-BY-2.0', 'CC-BY-SA-2.0', 'CC-BY-NC-2.0', 'CC-BY-ND-2.0']


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(folder: Path) -> Path:
    """img2dataset-style tar shards (jpg + txt + json per sample; every 10th image broken); returns a .txt
    list of them, the manifest the ranks split."""
    folder.mkdir()
    paths = []
    for s in range(N_SHARDS):
        path = folder / f'{s:05d}.tar'
        with tarfile.open(path, 'w') as tar:
            for j in range(PER_SHARD):
                i = s * PER_SHARD + j
                rng = np.random.default_rng(i)
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40 + j, 48, 3), dtype=np.uint8)).save(buffer, format='JPEG')
                image = buffer.getvalue() if i % 10 else b'broken'
                meta = {'photo_id': str(9000 + i), 'license': LICENSES[i % 4], 'creator': f'maker {i}',
                        'license_url': f'https://example.org/licence/{i % 4}'}
                _member(tar, f'{s:05d}{j:04d}.jpg', image)
                _member(tar, f'{s:05d}{j:04d}.txt', f'a small picture number {i}'.encode())
                _member(tar, f'{s:05d}{j:04d}.json', json.dumps(meta).encode())
        paths.append(path.name)
    manifest = folder / 'shards.txt'
    manifest.write_text('\n'.join(paths) + '\n')
    return manifest


def _rows(out: Path) -> set[tuple]:
    rows = set()
    for split in ('train', 'eval'):
        if (out / split / 'index.json').exists():
            with shm_prefix_lock():
                dataset = StreamingDataset(local=str(out), split=split, shuffle=False, batch_size=1)
            rows |= {(split, r['key'], r['sha256'], r['license'], r['license_url'], r['creator'], r['caption'])
                     for r in (dataset[i] for i in range(len(dataset)))}
    return rows


def test_four_ranks_equal_one_process(tmp_path):
    manifest = _shards(tmp_path / 'shards')
    common = ['--src', str(manifest), '--min-size', '16', '--eval-fraction', '0.2', '--commit-every', '5',
              '--license-set', 'noncommercial']
    single = images_to_mds.main([*common, '--out', str(tmp_path / 'one')])

    out = tmp_path / 'four'
    envs = [{'RANK': '0', 'WORLD_SIZE': '4'}, {'RANK': '1', 'WORLD_SIZE': '4'},  # composer / torchrun
            {'SLURM_ARRAY_TASK_ID': '12', 'SLURM_ARRAY_TASK_MIN': '10', 'SLURM_ARRAY_TASK_COUNT': '4'},  # Slurm
            {'SLURM_ARRAY_TASK_ID': '13', 'SLURM_ARRAY_TASK_MIN': '10', 'SLURM_ARRAY_TASK_COUNT': '4'}]
    clean = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE') and not k.startswith('SLURM')}
    procs = [subprocess.Popen([sys.executable, str(REPO / 'convert' / 'images_to_mds.py'), *common, '--out', str(out)],
                              env={**clean, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for env in envs]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert all(f'rank {r} of 4 done' in log for r, log in enumerate(logs)), logs
    assert not (out / 'train' / 'index.json').exists()  # ranks leave the merged index to the merge step
    merged = images_to_mds.main([*common, '--out', str(out), '--merge'])

    assert _rows(out) == _rows(tmp_path / 'one') and len(_rows(out)) == single['kept']
    for field in ('kept', 'skipped', 'splits', 'skipped_by_reason'):
        assert merged[field] == single[field], field
    assert merged['skipped_by_reason'] == {'license_excluded_nd': 21, 'not_an_image': 9}
    names = {p.name for p in (out / 'train').iterdir() if p.is_dir()}
    assert {n.split('-part-')[0] for n in names} == {f'rank-{r:05d}' for r in range(4)}  # each rank its own parts

    # resumable per rank: re-running rank 2 finds everything done; a different world size is refused
    again = images_to_mds.main([*common, '--out', str(out), '--rank', '2', '--world-size', '4'])
    assert again['kept'] + again['skipped'] == sum(1 for i in range(N_SHARDS * PER_SHARD) if i // PER_SHARD % 4 == 2)
    with pytest.raises(SystemExit, match=r'--world-size 4 \(now --world-size 3\)'):
        images_to_mds.main([*common, '--out', str(out), '--rank', '0', '--world-size', '3'])
    assert _rows(out) == _rows(tmp_path / 'one')


def test_rank_from_env():
    assert rank_from_env({}) == (0, 1)
    assert rank_from_env({'RANK': '3', 'WORLD_SIZE': '8'}) == (3, 8)
    assert rank_from_env({'SLURM_ARRAY_TASK_ID': '5', 'SLURM_ARRAY_TASK_COUNT': '6'}) == (5, 6)
    assert rank_from_env({'SLURM_ARRAY_TASK_ID': '7', 'SLURM_ARRAY_TASK_MIN': '2', 'SLURM_ARRAY_TASK_COUNT': '6'}) == (5, 6)
    with pytest.raises(ValueError, match='not in'):
        rank_from_env({'RANK': '4', 'WORLD_SIZE': '4'})


def test_mds_row_layout_matches_streaming(tmp_path):
    """mds_rows.RowReader parses MDS rows itself (to keep image bytes as stored): if streaming changes the row
    layout or the reader API it relies on, this fails, naming the column."""
    from streaming import MDSWriter

    columns = {'image': 'jpeg', 'caption': 'str', 'n': 'int', 'vec': 'ndarray:float32:3', 'blob': 'bytes'}
    rng = np.random.default_rng(0)
    samples = []
    with MDSWriter(out=str(tmp_path / 'ds'), columns=columns, size_limit=4096) as writer:
        for i in range(9):
            image = Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8))
            sample = {'image': image, 'caption': f'row {i}' * (i + 1), 'n': i,
                      'vec': np.arange(3, dtype=np.float32) + i, 'blob': bytes([i]) * i}
            writer.write(sample)
            samples.append(sample)
    reader = RowReader(tmp_path / 'ds')
    assert reader.columns == columns and len(reader) == 9
    index = json.loads((tmp_path / 'ds' / 'index.json').read_text())
    assert len(index['shards']) > 1  # rows are found across shards
    streamed = []
    for info in index['shards']:
        shard = reader_from_json(str(tmp_path / 'ds'), None, info)
        streamed.extend(shard[i] for i in range(shard.samples))
    for i, want in enumerate(streamed):
        row = reader.row(i)
        assert Image.open(io.BytesIO(row['image'])).tobytes() == want['image'].tobytes(), 'image'
        for name in ('caption', 'n', 'blob'):
            assert row[name] == want[name], name
        assert np.array_equal(row['vec'], want['vec']), 'vec'
