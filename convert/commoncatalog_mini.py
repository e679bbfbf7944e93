"""Build the CommonCatalog mini set: openly licensed images from package registries, as MDS shards.

Sources (fetched once into ``--cache-dir``, no root needed):
  openmoji     npm ``openmoji``                   colour SVG emoji, CC BY-SA 4.0, per-emoji author
  twemoji      npm ``emoji-datasource-twitter``   64 px PNG emoji, CC-BY 4.0
  openclipart  Debian ``openclipart-svg``         SVG clip art, public domain (a few others)
  tuxpaint     Debian ``tuxpaint-stamps-default`` stamps, GPL-2.0 (not Creative Commons: ``all`` only)

Each image is sanitised, rendered (SVG) onto a white background, resized so its longer side is at most
``--size``, and kept only when its licence is in ``--license-set`` (ND licences never are). Writes
``train/`` and ``eval/`` MDS splits (the shared columns plus ``category``: OpenMoji's ``group`` or Twemoji's
``category``, empty for clip art), ``attribution.csv`` and ``report.json``. A killed run re-run
with the same arguments continues where it stopped.

Example:
    python convert/commoncatalog_mini.py --out data/commoncatalog_mini --license-set commercial \
        --max-per-source 500 --size 256 --workers 2
"""
from __future__ import annotations

import argparse
import functools
import logging
import re
from pathlib import Path
from typing import Any

from diffusion.data.licenses import LICENSE_SETS, in_license_set, license_family, normalize_license
from diffusion.data.sanitize import SkipSample, clean_caption, is_weak_caption, sanitize_image
from diffusion.data.sources import SOURCES, Item, read_svg_metadata
from diffusion.data.convert_args import add_writer_args, print_summary, writer_from_args
from diffusion.data.pool import run_conversion
from diffusion.data.writer import make_sample

DEFAULT_SOURCES = {'commercial': ['openmoji', 'twemoji', 'openclipart'],
                   'noncommercial': ['openmoji', 'twemoji', 'openclipart'],
                   'all': ['openmoji', 'twemoji', 'openclipart', 'tuxpaint']}
# Columns beyond the shared schema: the source's own category (OpenMoji `group`, Twemoji `category`).
EXTRA_COLUMNS = {'category': 'str'}


def _caption_and_meta(item: Item, data: bytes) -> tuple[str, str, str, str]:
    """(caption, caption_source, licence text, creator); OpenClipart's live inside the SVG."""
    if item.source != 'openclipart':
        return item.caption, item.caption_source, item.license, item.creator
    meta = read_svg_metadata(data)
    title, description = meta.get('title', ''), meta.get('description', '')
    if description and len(description) <= 300 and not is_weak_caption(description):
        caption, caption_source = description, 'description'
    else:
        caption, caption_source = title, 'title'
    # The Debian package's copyright file dedicates every image without its own licence to the
    # public domain; an image that names another licence (e.g. GPL-2) keeps it.
    license_text = meta.get('license') or 'public domain'
    return caption, caption_source, license_text, meta.get('creator', '') or 'unknown'


def convert_item(item: Item, opts: dict[str, Any]) -> dict[str, Any]:
    """Turn one source item into an MDS row, or raise :class:`SkipSample` (runs in a worker)."""
    try:
        data = Path(item.path).read_bytes()
    except FileNotFoundError as err:
        raise SkipSample('missing_file', item.path) from err
    caption, caption_source, license_text, creator = _caption_and_meta(item, data)
    license_id = normalize_license(license_text)
    if not in_license_set(license_id, opts['license_set']):
        family = license_family(license_id)
        raise SkipSample(f'license_excluded_{license_id if family == "other" else family}', license_id)
    try:
        caption = clean_caption(caption)
    except SkipSample as err:
        if err.reason != 'empty_caption':
            raise
        caption = ''  # kept, flagged weak: the captioning step writes one
    clean = sanitize_image(data, svg=item.path.endswith('.svg'), min_size=opts['min_size'],
                           max_pixels=opts['max_pixels'], max_side=opts['size'])
    sample = make_sample(clean, key=item.key, caption=caption, caption_source=caption_source,
                         license_id=license_id, creator=creator, source=item.source,
                         source_path=item.source_path, image_format=opts['image_format'],
                         quality=opts['quality'])
    sample['category'] = item.category  # emoji group/category ('' for clip art): the demo's probe label
    return sample


def list_items(args: argparse.Namespace) -> list[Item]:
    """Fetch every requested source (cached) and list its items, filtered and capped."""
    include = re.compile(args.include) if args.include else None
    items = []
    for name in args.sources or DEFAULT_SOURCES[args.license_set]:
        fetch, lister = SOURCES[name]
        found = lister(fetch(Path(args.cache_dir)))
        if include is not None:
            found = [item for item in found if include.search(item.key)]
        items.extend(found[:args.max_per_source] if args.max_per_source else found)
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument('--license-set', choices=LICENSE_SETS, default='commercial')
    parser.add_argument('--sources', nargs='+', choices=sorted(SOURCES), default=None,
                        help='default: every source whose licences can enter --license-set')
    parser.add_argument('--cache-dir', default='data/cache', help='download cache (never re-downloaded)')
    parser.add_argument('--max-per-source', type=int, default=0, help='cap per source, in key order (0: all)')
    parser.add_argument('--include', default='', help='only keys matching this regex (e.g. "^openclipart/animals/")')
    add_writer_args(parser)
    parser.set_defaults(size=256)
    return parser.parse_args(argv)


def convert(args: argparse.Namespace, items: list[Item]) -> dict[str, Any]:
    """Convert listed items into ``args.out`` (everything :func:`main` does after listing); return the summary."""
    opts = {k: getattr(args, k) for k in ('license_set', 'min_size', 'max_pixels', 'size', 'image_format', 'quality')}
    with writer_from_args(args, extra_columns=EXTRA_COLUMNS) as writer:
        run_conversion(functools.partial(convert_item, opts=opts), items, writer, key=lambda i: i.key,
                       source=lambda i: i.source, workers=args.workers, desc='commoncatalog-mini')
    return writer.summary()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = convert(args, list_items(args))
    print_summary(report, args.out)
    return report


if __name__ == '__main__':
    main()
