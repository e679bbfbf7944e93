"""Convert your own images with captions to MDS shards (the same columns as the mini catalog).

``--src`` may be:
  * a folder of images (jpg, png, webp, gif, bmp, tif, svg) with sidecar captions: ``x.txt`` (the
    caption) or ``x.json`` (``caption`` plus optional ``license``, ``license_url``, ``creator``);
  * a manifest ``.csv``, ``.jsonl``, ``.parquet`` or ``.arrow`` with an image column (``image``/``path``/``file``:
    a path relative to the manifest, bytes, or a Hugging Face ``Image`` value ``{bytes, path}``) and
    ``caption``/``text`` (plus optional ``key``, ``license``, ``creator``);
  * a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``: every
    split's ``.arrow`` files are read with pyarrow, offline; keys are ``<split>/<row>``), or a folder of the
    parquet files ``Dataset.to_parquet`` / the Hub write;
  * a webdataset / img2dataset ``.tar`` shard, a folder tree of them, or a ``.txt`` list of shard paths
    (members ``k.jpg``, ``k.txt``, ``k.json``). From img2dataset's JSON the ``license``, ``license_url`` and
    ``creator`` members are kept and ``photo_id`` (``convert/yfcc_filter.py`` lists) becomes the key; the
    ``<shard>.parquet`` img2dataset writes beside each tar names the downloads that failed: each is counted
    under ``img2dataset_<status>`` (``failed_to_download``, ``failed_to_resize``) unless a later pass
    (``yfcc_filter.py --retry-from``) fetched that photo.
Bad files are skipped, counted by reason and named in report.json (``skipped_files``) and the summary: an image
without a caption (``missing_caption``: no ``x.txt``/``x.json`` beside it, or no caption column value), a blank
caption (``empty_caption``), a file that does not decode (``corrupt``, ``empty_file``, ...). Images without a
caption are skipped unless ``--keep-empty-captions`` (then kept and flagged in ``caption_weak``). With
``--eval-fraction`` above 0 any set of 2+ images holds at least one out in ``eval``. Nothing kept exits 1 with
a hint. Re-running with the same arguments resumes; with other ones it stops naming the changed options.

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

import pyarrow as pa

from diffusion.data.convert_args import add_writer_args, print_summary, rank_from_env, writer_from_args
from diffusion.data.licenses import in_license_set, license_family, normalize_license
from diffusion.data.pool import run_conversion
from diffusion.data.sanitize import SkipSample, clean_caption, sanitize_image
from diffusion.data.writer import held_out_keys, make_sample, merge_ranks

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.gif', '.bmp', '.tif', '.tiff', '.svg')
MANIFEST_SUFFIXES = ('.csv', '.jsonl', '.parquet', '.arrow')
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


def read_arrow(path: Path) -> pa.Table:
    """An Arrow IPC file: the stream format ``datasets`` writes (``save_to_disk``, its cache), else the file format."""
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def manifest_items(src: Path, prefix: str = '') -> Iterator[dict[str, Any]]:
    """Rows of a CSV / JSONL / parquet / arrow manifest (keys, when no ``key`` column, start with ``prefix``)."""
    if src.suffix == '.parquet':
        rows = pq.read_table(src).to_pylist()
    elif src.suffix == '.arrow':
        rows = read_arrow(src).to_pylist()
    elif src.suffix == '.csv':
        rows = pacsv.read_csv(src).to_pylist()
    else:
        rows = [json.loads(line) for line in src.read_text(encoding='utf-8').splitlines() if line.strip()]
    for index, row in enumerate(rows):
        image = _first(row, _IMAGE_COLUMNS)
        if isinstance(image, dict):  # a Hugging Face Image value: embedded bytes, else a path
            image = image.get('bytes') or image.get('path')
        item = {k: v for k, v in row.items() if k not in _IMAGE_COLUMNS}
        item['caption'] = _first(row, _CAPTION_COLUMNS)
        if isinstance(image, (bytes, bytearray)):
            item.update(data=bytes(image), source_path=f'{prefix}{src.name}#{index}')
        else:
            path = Path(str(image or ''))
            path = path if path.is_absolute() else src.parent / path
            item.update(path=str(path), source_path=str(image))
        item['key'] = str(row.get('key') or item['source_path'])
        yield item


def hf_saved_files(src: Path) -> list[Path] | None:
    """The data files of a Hugging Face ``datasets`` folder: ``save_to_disk``'s ``.arrow`` files (of every split
    of a ``DatasetDict``), or a folder holding only parquet files; None for any other folder."""
    if (src / 'dataset_dict.json').exists():
        splits = json.loads((src / 'dataset_dict.json').read_text())['splits']
        return [f for split in splits for f in sorted((src / split).glob('*.arrow'))]
    if (src / 'state.json').exists() and (src / 'dataset_info.json').exists():
        return sorted(src.glob('*.arrow'))
    parquet = sorted(src.rglob('*.parquet'))
    if parquet and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in src.rglob('*')):
        return parquet
    return None


def hf_items(src: Path, files: list[Path]) -> Iterator[dict[str, Any]]:
    """Rows of a Hugging Face dataset's files, keyed by the file's folder below ``src`` (its split) and row."""
    for path in files:
        folder = path.parent.relative_to(src).as_posix()
        yield from manifest_items(path, prefix='' if folder == '.' else f'{folder}/')


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
        hf_files = hf_saved_files(src)
        if hf_files is not None:
            return list(hf_items(src, hf_files))[rank::world]
        return list(folder_items(src))[rank::world]
    raise SystemExit(f'--src {src}: not a folder, manifest ({", ".join(MANIFEST_SUFFIXES)}), Hugging Face '
                     f'datasets folder, .tar shard or .txt list of shards')


def _likely_kept(item: dict[str, Any], opts: dict[str, Any]) -> bool:
    """Whether an item passes the cheap checks (a caption, a file): the eval split is drawn from these, so that a
    small set's held-out image is not one skipped later for want of a caption."""
    if item.get('_failed') or item.get('_bad_json') or not (item.get('data') or Path(item.get('path', '')).is_file()):
        return False
    caption = item.get('caption')
    text = caption.decode('utf-8', 'replace') if isinstance(caption, bytes) else str(caption or '')
    return bool(text.strip()) or opts['keep_empty_captions']


def _converts(item: dict[str, Any], opts: dict[str, Any]) -> bool:
    """Whether ``item`` converts (tried only on the few a small set's eval split is chosen from)."""
    try:
        convert_item(item, opts)
    except Exception:  # noqa: BLE001 - SkipSample or a broken file: not a held-out candidate
        return False
    return True


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
    if 'data' in item:
        data = item['data']
    else:
        try:
            data = Path(item['path']).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as err:
            raise SkipSample('missing_file', item['path']) from err
    # The image first: a broken file is reported as broken whether or not it has a caption.
    clean = sanitize_image(data, svg=str(item.get('path', '')).lower().endswith('.svg'),
                           min_size=opts['min_size'], max_pixels=opts['max_pixels'], max_side=opts['size'])
    try:
        if item.get('caption') is None:
            raise SkipSample('missing_caption', 'no caption file (x.txt or x.json beside x.jpg) or caption value')
        caption = clean_caption(item['caption'])
    except SkipSample as err:
        if not (err.reason in ('missing_caption', 'empty_caption') and opts['keep_empty_captions']):
            raise
        caption = ''
    return make_sample(clean, key=item['key'], caption=caption,
                       caption_source=str(item.get('caption_source') or 'provided'), license_id=license_id,
                       creator=str(item.get('creator') or opts['creator']), source=opts['source'],
                       source_path=item['source_path'], image_format=opts['image_format'],
                       quality=opts['quality'], license_link=str(item.get('license_url') or ''))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --eval-frac must not pass for --eval-fraction
    parser.add_argument('--src', required=True, type=Path,
                        help='folder, manifest, Hugging Face datasets folder or tar shard(s)')
    parser.add_argument('--license', default='unknown', help='licence of items that do not state one')
    parser.add_argument('--creator', default='', help='creator of items that do not state one')
    parser.add_argument('--source', default='', help='value of the `source` column (default: --src name)')
    parser.add_argument('--license-set', choices=('commercial', 'noncommercial', 'all'), default=None,
                        help='keep only items whose licence is in this set (default: keep all)')
    parser.add_argument('--keep-empty-captions', action='store_true',
                        help='keep images without a caption (or a blank one), flagged caption_weak=1')
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
    # One rank sees every item, so a small set is sure of an eval split; ranks keep the hash split alone.
    by_key = {i['key']: i for i in items if _likely_kept(i, opts)}
    held = set() if multi else held_out_keys(list(by_key), args.eval_fraction, lambda k: _converts(by_key[k], opts))
    with writer_from_args(args, rank=args.rank if multi else None) as writer:
        run_conversion(functools.partial(convert_item, opts=opts), items, writer, key=lambda i: i['key'],
                       source=lambda i: opts['source'], name=lambda i: i['source_path'],
                       split=lambda i: 'eval' if i['key'] in held else ('train' if held else None),
                       workers=args.workers, desc='images-to-mds')
    report = writer.summary()
    print_summary(report, args.out)
    if multi:
        print(f'rank {args.rank} of {args.world_size} done; when every rank is, run the same command with --merge')
    elif not report['kept']:
        raise SystemExit(nothing_kept_hint(report, args.src))
    return report


def nothing_kept_hint(report: dict[str, Any], src: str) -> str:
    """The one line a conversion that kept nothing ends with: why, and what to do."""
    reasons = report['skipped_by_reason']
    if not report['skipped']:
        return f'error: no images found in --src {src} (image files: {", ".join(IMAGE_SUFFIXES)})'
    hint = f'error: nothing kept of {report["skipped"]} images in --src {src} ({reasons})'
    if reasons.get('missing_caption', 0) + reasons.get('empty_caption', 0):
        hint += ('; no captions found: put each caption in a text file named like its image (x.txt beside x.jpg, '
                 'or x.json with "caption"), or pass --keep-empty-captions to train on them without captions')
    return hint + '; every skipped file is listed in report.json'


if __name__ == '__main__':
    main()
