"""Filter YFCC100M metadata into CommonCatalog download lists (commercial and non-commercial).

Reads the YFCC100M ``yfcc100m_dataset`` file (tab-separated, no header, 25 columns; optionally
``.bz2``/``.gz``), keeps photos under Creative-Commons licences without ND, and writes one download
list per licence set: ``<out>`` for the set chosen by ``--license-set`` and, with ``--split-sets``,
``<stem>.commercial<ext>`` and ``<stem>.noncommercial<ext>`` (NC rows only). Output is parquet or CSV by
extension, with the columns img2dataset-style downloaders take: ``url``, ``key``, ``caption``
(title, else description), ``title``, ``description``, ``tags``, ``license``, ``license_url``,
``creator``, ``page_url``, ``width``/``height`` when known. A summary counts kept and dropped rows by
reason.

Example:
    python convert/yfcc_filter.py --metadata yfcc100m_dataset.bz2 --out cc_commercial.parquet \
        --license-set commercial
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

from diffusion.data.licenses import LICENSE_SETS, in_license_set, license_family, normalize_license

# YFCC100M dataset file columns (0-based), as documented by the YFCC100M release.
YFCC_COLUMNS = ('line', 'photo_id', 'photo_hash', 'user_nsid', 'user_nickname', 'date_taken',
                'date_uploaded', 'capture_device', 'title', 'description', 'user_tags', 'machine_tags',
                'longitude', 'latitude', 'accuracy', 'page_url', 'download_url', 'license_name',
                'license_url', 'server_id', 'farm_id', 'secret', 'secret_original', 'extension',
                'marker')
OUTPUT_COLUMNS = ('url', 'key', 'caption', 'title', 'description', 'tags', 'license', 'license_url',
                  'creator', 'page_url', 'width', 'height')


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
    return {
        'url': row['download_url'],
        'key': row['photo_id'],
        'caption': title or description,
        'title': title,
        'description': description,
        'tags': _decode(row['user_tags']).replace(',', ', '),
        'license': license_id,
        'license_url': row['license_url'],
        'creator': _decode(row['user_nickname']) or row['user_nsid'],
        'page_url': row['page_url'],
        'width': width,
        'height': height,
    }, ''


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--metadata', required=True, type=Path, help='YFCC100M dataset file (.bz2/.gz ok)')
    parser.add_argument('--out', required=True, type=Path, help='output list (.parquet or .csv)')
    parser.add_argument('--license-set', choices=LICENSE_SETS[:2], default='noncommercial',
                        help='commercial: CC-BY, CC-BY-SA, CC0/PD; noncommercial adds NC (ND never kept)')
    parser.add_argument('--min-size', type=int, default=0, help='drop photos with a known shorter side below this')
    parser.add_argument('--split-sets', action='store_true', help='also write <stem>.commercial and .noncommercial')
    args = parser.parse_args(argv)
    report = run(args.metadata, args.out, args.license_set, args.min_size, args.split_sets)
    print(f'kept {report["kept"]}, dropped {sum(report["dropped"].values())} {report["dropped"]} -> {args.out}')
    return report


if __name__ == '__main__':
    main()
