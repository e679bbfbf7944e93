"""Convert your own images with captions to MDS shards (the same columns as the mini catalog).

``--src`` may be:
  * a folder of images (jpg, png, webp, gif, bmp, tif, svg) with sidecar captions: ``x.txt`` (the
    caption) or ``x.json`` (``caption`` plus optional ``license``, ``license_url``, ``creator``);
  * a manifest ``.csv``, ``.jsonl`` or ``.parquet`` with an image column (``image``/``path``/``file``:
    a path relative to the manifest, or bytes) and ``caption``/``text`` (plus optional ``key``,
    ``license``, ``creator``);
  * a webdataset / img2dataset ``.tar`` shard, a folder tree of them, or a ``.txt`` list of shard paths
    (members ``k.jpg``, ``k.txt``, ``k.json``). From img2dataset's JSON the ``license``, ``license_url`` and
    ``creator`` members are kept and ``photo_id`` (``convert/yfcc_filter.py`` lists) becomes the key; the
    ``<shard>.parquet`` img2dataset writes beside each tar names the downloads that failed: each is counted
    under ``img2dataset_<status>`` (``failed_to_download``, ``failed_to_resize``) unless a later pass
    (``yfcc_filter.py --retry-from``) fetched that photo.
Bad files are skipped and counted by reason (report.json); empty captions are skipped unless
``--keep-empty-captions`` (then kept and flagged in ``caption_weak``). Re-running with the same
arguments resumes.

On many machines, ranks split the tar shards (shard ``i`` goes to rank ``i % W``; other sources split by
item); rank and W come from ``--rank``/``--world-size``, else ``RANK``/``WORLD_SIZE`` (composer, torchrun)
or a Slurm job array (``scripts/slurm/convert_array.sbatch``). Each rank writes its own parts into ``--out``
(resumable per rank); once all have finished, ``--merge`` writes the index, report and attribution.

Example:
    python convert/images_to_mds.py --src my_photos/ --out data/my_photos --license CC-BY-4.0 --workers 2
    RANK=3 WORLD_SIZE=8 python convert/images_to_mds.py --src shards/ --out data/cc   # ... for ranks 0-7
    python convert/images_to_mds.py --src shards/ --out data/cc --world-size 8 --merge
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import tarfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from diffusion.data.licenses import in_license_set, license_family, normalize_license
from diffusion.data.sanitize import SkipSample, clean_caption, sanitize_image
from diffusion.data.cli import rank_from_env
from diffusion.data.writer import (add_writer_args, make_sample, merge_ranks, print_summary, run_conversion,
                                   writer_from_args)

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.gif', '.bmp', '.tif', '.tiff', '.svg')
MANIFEST_SUFFIXES = ('.csv', '.jsonl', '.parquet')
_IMAGE_COLUMNS = ('image', 'path', 'file', 'filepath', 'image_path', 'jpg', 'png')
_CAPTION_COLUMNS = ('caption', 'text', 'txt', 'alt', 'title')


def _first(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((row[n] for n in names if row.get(n) not in (None, '')), None)


def _meta(raw: bytes | str | dict | None) -> dict[str, Any]:
    """A JSON sidecar's fields; non-UTF-8 bytes become a caption that :func:`clean_caption` rejects."""
    if raw is None or isinstance(raw, dict):
        return dict(raw or {})
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        return {'caption': raw if isinstance(raw, bytes) else raw.encode()}
    except json.JSONDecodeError:
        return {'_bad_json': True}


def folder_items(src: Path) -> Iterator[dict[str, Any]]:
    """Images in a folder tree with ``.txt``/``.json`` sidecars."""
    for path in sorted(p for p in src.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt, js = path.with_suffix('.txt'), path.with_suffix('.json')
        meta = _meta(js.read_bytes()) if js.exists() else {}
        if txt.exists():
            meta['caption'] = txt.read_bytes()
        rel = path.relative_to(src)
        yield {'key': str(rel.with_suffix('')), 'path': str(path), 'source_path': str(rel), **meta}


def manifest_items(src: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV / JSONL / parquet manifest."""
    if src.suffix == '.parquet':
        rows = pq.read_table(src).to_pylist()
    elif src.suffix == '.csv':
        rows = pacsv.read_csv(src).to_pylist()
    else:
        rows = [json.loads(line) for line in src.read_text(encoding='utf-8').splitlines() if line.strip()]
    for index, row in enumerate(rows):
        image = _first(row, _IMAGE_COLUMNS)
        item = {k: v for k, v in row.items() if k not in _IMAGE_COLUMNS}
        item['caption'] = _first(row, _CAPTION_COLUMNS)
        if isinstance(image, (bytes, bytearray)):
            item.update(data=bytes(image), source_path=f'{src.name}#{index}')
        else:
            path = Path(str(image or ''))
            path = path if path.is_absolute() else src.parent / path
            item.update(path=str(path), source_path=str(image))
        item['key'] = str(row.get('key') or item['source_path'])
        yield item


def tar_shards(src: Path) -> list[Path]:
    """The tar shards of ``src``: one ``.tar``, a folder tree of them, or a ``.txt`` list (one path a line)."""
    if src.suffix == '.txt':
        lines = [line.strip() for line in src.read_text(encoding='utf-8').splitlines() if line.strip()]
        return [p if p.is_absolute() else src.parent / p for p in map(Path, lines)]
    return sorted(src.rglob('*.tar')) if src.is_dir() else [src]


def _failed_downloads(shard: Path) -> Iterator[dict[str, Any]]:
    """img2dataset's failures recorded in the parquet file beside ``shard`` (none when there is none)."""
    table = shard.with_suffix('.parquet')
    if not table.exists():
        return
    for row in pq.read_table(table).to_pylist():
        if row.get('status') not in (None, 'success'):
            key = str(row.get('photo_id') or f'{shard.stem}/{row.get("key")}')
            yield {'key': key, '_failed': str(row['status']), 'source_path': f'{shard.name}:{row.get("key")}',
                   'detail': str(row.get('error_message') or '')}


def tar_items(shards: list[Path]) -> Iterator[dict[str, Any]]:
    """Samples of webdataset / img2dataset tar shards (grouped by member basename), then their failures."""
    for shard in shards:
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                stem, _, ext = member.name.partition('.')
                groups.setdefault(stem, {})[ext.lower()] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for stem, parts in sorted(groups.items()):
            ext = next((e for e in ('jpg', 'jpeg', 'png', 'webp') if e in parts), None)
            meta = _meta(parts.get('json'))
            if 'txt' in parts:
                meta['caption'] = parts['txt']
            key = str(meta.get('photo_id') or f'{shard.stem}/{stem}')
            yield {**meta, 'key': key, 'data': parts.get(ext, b'') if ext else b'',
                   'source_path': f'{shard.name}:{stem}.{ext}'}
        yield from _failed_downloads(shard)


def _drop_recovered(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A failure whose photo another pass downloaded (or that failed twice) is counted once, or not at all."""
    fetched = {item['key'] for item in items if '_failed' not in item}
    kept, failed = [], set()
    for item in items:
        if '_failed' in item:
            if item['key'] in fetched or item['key'] in failed:
                continue
            failed.add(item['key'])
        kept.append(item)
    return kept


def list_items(src: Path, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
    """This rank's items of ``src`` (all of them with one rank)."""
    if src.suffix in ('.tar', '.txt') or (src.is_dir() and any(src.rglob('*.tar'))):
        return _drop_recovered(list(tar_items(tar_shards(src)[rank::world])))
    if src.is_file() and src.suffix.lower() in MANIFEST_SUFFIXES:
        return list(manifest_items(src))[rank::world]
    if src.is_dir():
        return list(folder_items(src))[rank::world]
    raise SystemExit(f'--src {src}: not a folder, manifest ({", ".join(MANIFEST_SUFFIXES)}), .tar shard or '
                     f'.txt list of shards')


def convert_item(item: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Turn one listed item into an MDS row, or raise :class:`SkipSample` (runs in a worker)."""
    if item.get('_failed'):
        raise SkipSample(f'img2dataset_{item["_failed"]}', item['detail'])
    if item.get('_bad_json'):
        raise SkipSample('bad_sidecar_json')
    license_id = 'unknown'  # the first of: the stated licence, its URL, --license
    for text in (item.get('license'), item.get('license_url'), opts['license']):
        license_id = normalize_license(str(text or ''))
        if license_id != 'unknown':
            break
    if opts['license_set'] and not in_license_set(license_id, opts['license_set']):
        raise SkipSample(f'license_excluded_{license_family(license_id)}', license_id)
    try:
        caption = clean_caption(item.get('caption'))
    except SkipSample as err:
        if not (err.reason == 'empty_caption' and opts['keep_empty_captions']):
            raise
        caption = ''
    if 'data' in item:
        data = item['data']
    else:
        try:
            data = Path(item['path']).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as err:
            raise SkipSample('missing_file', item['path']) from err
    clean = sanitize_image(data, svg=str(item.get('path', '')).lower().endswith('.svg'),
                           min_size=opts['min_size'], max_pixels=opts['max_pixels'], max_side=opts['size'])
    return make_sample(clean, key=item['key'], caption=caption,
                       caption_source=str(item.get('caption_source') or 'provided'), license_id=license_id,
                       creator=str(item.get('creator') or opts['creator']), source=opts['source'],
                       source_path=item['source_path'], image_format=opts['image_format'],
                       quality=opts['quality'], license_link=str(item.get('license_url') or ''))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--src', required=True, type=Path, help='folder, manifest or tar shard(s)')
    parser.add_argument('--license', default='unknown', help='licence of items that do not state one')
    parser.add_argument('--creator', default='', help='creator of items that do not state one')
    parser.add_argument('--source', default='', help='value of the `source` column (default: --src name)')
    parser.add_argument('--license-set', choices=('commercial', 'noncommercial', 'all'), default=None,
                        help='keep only items whose licence is in this set (default: keep all)')
    parser.add_argument('--keep-empty-captions', action='store_true', help='keep them, flagged caption_weak=1')
    ranks = parser.add_argument_group('many machines')
    ranks.add_argument('--rank', type=int, default=None, help='this rank (default: from the environment)')
    ranks.add_argument('--world-size', type=int, default=None, help='number of ranks (default: environment)')
    ranks.add_argument('--merge', action='store_true', help='after every rank finished: write index, report')
    add_writer_args(parser)
    args = parser.parse_args(argv)
    if (args.rank is None) != (args.world_size is None) and not args.merge:
        parser.error('--rank and --world-size go together')
    if args.rank is None:
        try:
            rank, world = rank_from_env()
        except ValueError as err:
            parser.error(str(err))
        args.rank, args.world_size = rank, args.world_size or world
    if not 0 <= args.rank < args.world_size:
        parser.error(f'--rank {args.rank} is not in [0, --world-size {args.world_size})')
    if args.overwrite and args.world_size > 1:
        parser.error('--overwrite with several ranks would delete the other ranks\' parts: clear --out once first')
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.src = args.src.resolve()
    logging.basicConfig(level=logging.WARNING)
    if args.merge:
        report = merge_ranks(args.out)
        print_summary(report, args.out)
        return report
    multi = args.world_size > 1
    items = list_items(args.src, args.rank, args.world_size)
    opts = {k: getattr(args, k) for k in ('license', 'creator', 'license_set', 'keep_empty_captions', 'min_size',
                                          'max_pixels', 'size', 'image_format', 'quality')}
    opts['source'] = args.source or args.src.name
    args.src = str(args.src)
    with writer_from_args(args, rank=args.rank if multi else None) as writer:
        run_conversion(functools.partial(convert_item, opts=opts), items, writer, key=lambda i: i['key'],
                       source=lambda i: opts['source'], workers=args.workers, desc='images-to-mds')
    report = writer.summary()
    print_summary(report, args.out)
    if multi:
        print(f'rank {args.rank} of {args.world_size} done; when every rank is, run the same command with --merge')
    return report


if __name__ == '__main__':
    main()
