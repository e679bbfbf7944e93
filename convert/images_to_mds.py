"""Convert your own images with captions to MDS shards (the same columns as the mini catalog).

``--src`` may be:
  * a folder of images (jpg, png, webp, gif, bmp, tif, svg) with sidecar captions: ``x.txt`` (the
    caption) or ``x.json`` (``caption`` plus optional ``license``, ``license_url``, ``creator``);
  * a manifest ``.csv``, ``.jsonl`` or ``.parquet`` with an image column (``image``/``path``/``file``:
    a path relative to the manifest, or bytes) and ``caption``/``text`` (plus optional ``key``,
    ``license``, ``creator``);
  * a webdataset / img2dataset ``.tar`` shard or a folder of them (members ``k.jpg``, ``k.txt``,
    ``k.json``; img2dataset's parquet next to them is not needed).
Bad files are skipped and counted by reason (report.json); empty captions are skipped unless
``--keep-empty-captions`` (then kept and flagged in ``caption_weak``). Re-running with the same
arguments resumes.

Example:
    python convert/images_to_mds.py --src my_photos/ --out data/my_photos --license CC-BY-4.0 --workers 2
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
from diffusion.data.writer import add_writer_args, make_sample, print_summary, run_conversion, writer_from_args

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


def tar_items(src: Path) -> Iterator[dict[str, Any]]:
    """Samples of webdataset / img2dataset tar shards (grouped by member basename)."""
    for shard in sorted(src.glob('*.tar')) if src.is_dir() else [src]:
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
            yield {**meta, 'key': f'{shard.stem}/{stem}', 'data': parts.get(ext, b'') if ext else b'',
                   'source_path': f'{shard.name}:{stem}.{ext}'}


def list_items(src: Path) -> list[dict[str, Any]]:
    if src.is_file() and src.suffix.lower() in MANIFEST_SUFFIXES:
        return list(manifest_items(src))
    if src.suffix == '.tar' or (src.is_dir() and any(src.glob('*.tar'))):
        return list(tar_items(src))
    if src.is_dir():
        return list(folder_items(src))
    raise SystemExit(f'--src {src}: not a folder, manifest ({", ".join(MANIFEST_SUFFIXES)}) or .tar shard')


def convert_item(item: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Turn one listed item into an MDS row, or raise :class:`SkipSample` (runs in a worker)."""
    if item.get('_bad_json'):
        raise SkipSample('bad_sidecar_json')
    license_id = normalize_license(str(item.get('license_url') or item.get('license') or opts['license']))
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
                       quality=opts['quality'])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--src', required=True, type=Path, help='folder, manifest or tar shard(s)')
    parser.add_argument('--license', default='unknown', help='licence of items that do not state one')
    parser.add_argument('--creator', default='', help='creator of items that do not state one')
    parser.add_argument('--source', default='', help='value of the `source` column (default: --src name)')
    parser.add_argument('--license-set', choices=('commercial', 'noncommercial', 'all'), default=None,
                        help='keep only items whose licence is in this set (default: keep all)')
    parser.add_argument('--keep-empty-captions', action='store_true', help='keep them, flagged caption_weak=1')
    add_writer_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.src = args.src.resolve()
    logging.basicConfig(level=logging.WARNING)
    items = list_items(args.src)
    opts = {k: getattr(args, k) for k in ('license', 'creator', 'license_set', 'keep_empty_captions', 'min_size',
                                          'max_pixels', 'size', 'image_format', 'quality')}
    opts['source'] = args.source or args.src.name
    args.src = str(args.src)
    with writer_from_args(args) as writer:
        run_conversion(functools.partial(convert_item, opts=opts), items, writer, key=lambda i: i['key'],
                       source=lambda i: opts['source'], workers=args.workers, desc='images-to-mds')
    report = writer.summary()
    print_summary(report, args.out)
    return report


if __name__ == '__main__':
    main()
