"""Filter YFCC100M metadata into CommonCatalog download lists (commercial and non-commercial).

Reads the YFCC100M ``yfcc100m_dataset`` file (tab-separated, no header, 25 columns; optionally
``.bz2``/``.gz``), keeps photos under Creative-Commons licences without ND, and writes one download
list per licence set: ``<out>`` for the set chosen by ``--license-set`` and, with ``--split-sets``,
``<stem>.commercial<ext>`` and ``<stem>.noncommercial<ext>`` (NC rows only). Output is parquet or CSV by
extension, in the form img2dataset (https://github.com/rom1504/img2dataset) reads as it is: ``url`` and
``caption`` (title, else description), plus :data:`ADDITIONAL_COLUMNS` (``photo_id``, ``license``,
``license_url``, ``creator``, ...) that img2dataset copies into each sample's ``.json`` when they are
named in ``--save_additional_columns``. ``url`` is the original-size photo when the metadata holds its
secret and extension (CommonCanvas re-fetched high-resolution originals), else YFCC's standard
download URL; ``fallback_url`` holds the standard one. After a download, ``--retry-from`` writes a list
of the photos whose preferred URL failed, pointing at their fallback URL, for a second img2dataset pass.
A summary counts kept and dropped rows by reason.

Example:
    python convert/yfcc_filter.py --metadata yfcc100m_dataset.bz2 --out cc_commercial.parquet \
        --license-set commercial
    img2dataset --url_list cc_commercial.parquet --input_format parquet --output_format webdataset \
        --caption_col caption --save_additional_columns '[photo_id,license,license_url,creator,page_url,fallback_url]' \
        --output_folder shards/ --image_size 1024 --resize_only_if_bigger True --resize_mode keep_ratio
    python convert/yfcc_filter.py --retry-from shards/ --out cc_commercial.retry.parquet
"""
from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import io
import sys
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from diffusion.data.licenses import LICENSE_SETS, in_license_set, license_family, license_url, normalize_license

# YFCC100M dataset file columns (0-based), as documented by the YFCC100M release.
YFCC_COLUMNS = ('line', 'photo_id', 'photo_hash', 'user_nsid', 'user_nickname', 'date_taken',
                'date_uploaded', 'capture_device', 'title', 'description', 'user_tags', 'machine_tags',
                'longitude', 'latitude', 'accuracy', 'page_url', 'download_url', 'license_name',
                'license_url', 'server_id', 'farm_id', 'secret', 'secret_original', 'extension',
                'marker')
# img2dataset sets its own ``key`` (shard + index) in each sample, so the photo id has its own column.
OUTPUT_COLUMNS = ('url', 'fallback_url', 'photo_id', 'caption', 'title', 'description', 'tags', 'license',
                  'license_url', 'creator', 'page_url', 'width', 'height')
# Columns to pass to img2dataset's ``save_additional_columns``: they reach each sample's JSON.
ADDITIONAL_COLUMNS = ('photo_id', 'license', 'license_url', 'creator', 'page_url', 'fallback_url')


def _open_text(path: Path) -> IO[str]:
    if path.suffix == '.bz2':
        return io.TextIOWrapper(bz2.open(path), encoding='utf-8', errors='replace', newline='')
    if path.suffix == '.gz':
        return io.TextIOWrapper(gzip.open(path), encoding='utf-8', errors='replace', newline='')
    return open(path, encoding='utf-8', errors='replace', newline='')


def _decode(text: str) -> str:
    """YFCC text fields are URL-encoded with '+' for spaces."""
    return ' '.join(urllib.parse.unquote_plus(text).split())


def read_yfcc(path: Path) -> Iterator[dict[str, str]]:
    """Yield each metadata row as a dict keyed by :data:`YFCC_COLUMNS` (short rows are padded)."""
    csv.field_size_limit(sys.maxsize)
    with _open_text(path) as f:
        for fields in csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE):
            if not fields:
                continue
            fields = fields + [''] * (len(YFCC_COLUMNS) - len(fields))
            yield dict(zip(YFCC_COLUMNS, fields))


def filter_row(row: dict[str, str], license_set: str, min_size: int = 0) -> tuple[dict[str, Any] | None, str]:
    """Return (output row, '') for a kept photo, or (None, reason) for a dropped one."""
    if row['marker'].strip() not in ('0', 'photo', ''):
        return None, 'video'
    license_id = normalize_license(row['license_url'] or row['license_name'])
    if license_id == 'unknown':
        license_id = normalize_license(row['license_name'])
    family = license_family(license_id)
    if not in_license_set(license_id, license_set):
        return None, f'license_{family if family != "other" else license_id}'
    if not row['download_url'].startswith(('http://', 'https://')):
        return None, 'no_url'
    width, height = _size(row)
    if min_size and (width is None or min(width, height) < min_size):
        return None, 'too_small' if width is not None else 'size_unknown'
    title, description = _decode(row['title']), _decode(row['description'])
    original = original_url(row)
    return {
        'url': original or row['download_url'],
        'fallback_url': row['download_url'] if original else '',
        'photo_id': row['photo_id'],
        'caption': title or description,
        'title': title,
        'description': description,
        'tags': _decode(row['user_tags']).replace(',', ', '),
        'license': license_id,
        'license_url': row['license_url'] or license_url(license_id),
        'creator': _decode(row['user_nickname']) or row['user_nsid'],
        'page_url': row['page_url'],
        'width': width,
        'height': height,
    }, ''


def original_url(row: dict[str, str]) -> str:
    """The original-size photo's URL, or '' when the metadata lacks its secret or extension.

    Flickr serves originals at ``<server folder>/<photo id>_<original secret>_o.<original extension>``, in the
    same folder as the standard-size ``download_url`` (``<photo id>_<secret>.jpg``).
    """
    secret, ext, url = row['secret_original'].strip(), row['extension'].strip(), row['download_url']
    if not (secret and ext.isalnum() and row['photo_id'].isdigit() and '/' in url):
        return ''
    return f'{url.rsplit("/", 1)[0]}/{row["photo_id"]}_{secret}_o.{ext.lower()}'


def _size(row: dict[str, str]) -> tuple[int | None, int | None]:
    """Width/height from optional ``width``/``height`` machine tags (``exif:width=...``) when present."""
    found: dict[str, int] = {}
    for tag in _decode(row['machine_tags']).split(','):
        name, _, value = tag.strip().partition('=')
        if name.lower().endswith(('width', 'height')) and value.isdigit():
            found['width' if name.lower().endswith('width') else 'height'] = int(value)
    return found.get('width'), found.get('height')


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    """Write rows as parquet (``.parquet``) or CSV (anything else)."""
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        (c, pa.int64() if c in ('width', 'height') else pa.string()) for c in OUTPUT_COLUMNS]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f'.{out.name}.tmp')
    if out.suffix == '.parquet':
        pq.write_table(table, tmp)
    else:
        pacsv.write_csv(table, tmp)
    tmp.replace(out)


def run(metadata: Path, out: Path, license_set: str, min_size: int = 0, split_sets: bool = False) -> dict[str, Any]:
    """Filter ``metadata`` into ``out`` (and the C / NC lists with ``split_sets``); return counts."""
    kept: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for row in tqdm(read_yfcc(metadata), desc='yfcc', unit='row'):
        result, reason = filter_row(row, license_set, min_size)
        if result is None:
            dropped[reason] += 1
        else:
            kept.append(result)
    write_table(kept, out)
    report: dict[str, Any] = {'kept': len(kept), 'dropped': dict(dropped), 'out': str(out)}
    if split_sets:
        commercial = [r for r in kept if in_license_set(r['license'], 'commercial')]
        nc_only = [r for r in kept if not in_license_set(r['license'], 'commercial')]
        for name, rows in (('commercial', commercial), ('noncommercial', nc_only)):
            path = out.with_name(f'{out.stem}.{name}{out.suffix}')
            write_table(rows, path)
            report[name] = len(rows)
    return report


def retry_list(download_dir: Path, out: Path) -> dict[str, Any]:
    """Write the photos whose download failed in ``download_dir`` (img2dataset's per-shard parquet files),
    with their ``fallback_url`` as ``url``, for a second img2dataset pass; return counts."""
    failed, retry = 0, []
    for shard in sorted(Path(download_dir).rglob('*.parquet')):
        for row in pq.read_table(shard).to_pylist():
            if row.get('status') in (None, 'success'):
                continue
            failed += 1
            if row.get('fallback_url'):
                retry.append({c: row.get(c) for c in OUTPUT_COLUMNS} | {'url': row['fallback_url'], 'fallback_url': ''})
    write_table(retry, out)
    return {'failed': failed, 'retry': len(retry), 'out': str(out)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--metadata', type=Path, help='YFCC100M dataset file (.bz2/.gz ok)')
    source.add_argument('--retry-from', type=Path, help='img2dataset output folder: list its failures again, '
                        'at their fallback URL')
    parser.add_argument('--out', required=True, type=Path, help='output list (.parquet or .csv)')
    parser.add_argument('--license-set', choices=LICENSE_SETS[:2], default='noncommercial',
                        help='commercial: CC-BY, CC-BY-SA, CC0/PD; noncommercial adds NC (ND never kept)')
    parser.add_argument('--min-size', type=int, default=0, help='drop photos with a known shorter side below this')
    parser.add_argument('--split-sets', action='store_true', help='also write <stem>.commercial and .noncommercial')
    args = parser.parse_args(argv)
    if args.retry_from:
        report = retry_list(args.retry_from, args.out)
        print(f'{report["failed"]} failed downloads, {report["retry"]} with a fallback URL -> {args.out}')
        return report
    report = run(args.metadata, args.out, args.license_set, args.min_size, args.split_sets)
    print(f'kept {report["kept"]}, dropped {sum(report["dropped"].values())} {report["dropped"]} -> {args.out}')
    return report


if __name__ == '__main__':
    main()
