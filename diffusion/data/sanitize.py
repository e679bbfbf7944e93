"""The one image-sanitising function and the caption checks shared by every converter.

A bad input raises :class:`SkipSample` with a short machine-readable ``reason``; converters catch it,
count the reason in their report and carry on, so a run never dies half-way on one bad file.

Skip reasons raised here: ``empty_file``, ``not_an_image``, ``corrupt``, ``truncated``,
``decompression_bomb``, ``too_small``, ``caption_not_utf8``, ``empty_caption``. (``duplicate`` is
decided by the writer, which sees every sample.)
"""
from __future__ import annotations

import hashlib
import io
import re
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file is an error, never silently half-decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_IMAGE_MAGIC = (b'\x89PNG', b'\xff\xd8\xff', b'GIF8', b'BM', b'II*\x00', b'MM\x00*')
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb threshold (about 0.25 GiB of RGBA).


class SkipSample(Exception):
    """A sample that cannot be kept; ``reason`` is the key it is counted under in reports."""

    def __init__(self, reason: str, detail: str = '') -> None:
        super().__init__(f'{reason}: {detail}' if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class CleanImage:
    """A decoded, upright RGB image and facts about its source file.

    Attributes:
        image: RGB image, EXIF orientation applied, transparency composited onto the background,
            resized so its longer side is at most ``max_side`` when that was given.
        width: Width of the upright source image in pixels (before any resize).
        height: Height of the upright source image in pixels (before any resize).
        sha256: Hex digest of the source file's bytes (exact-duplicate detection).
    """
    image: Image.Image
    width: int
    height: int
    sha256: str


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any PIL mode (P, L, LA, RGBA, CMYK, I;16, I, F, 1) to 8-bit RGB."""
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        array = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith('I;16') or array.max() > 255 else 255.0
        array = np.clip(array / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode='L')
    if image.mode == 'P' or image.mode == 'PA':
        image = image.convert('RGBA')
    if image.mode in ('LA', 'La', 'RGBa'):
        image = image.convert('RGBA')
    if image.mode == 'RGBA':
        canvas = Image.new('RGB', image.size, background)
        canvas.paste(image, mask=image.getchannel('A'))
        return canvas
    return image.convert('RGB') if image.mode != 'RGB' else image


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode ``data``, translating PIL's errors into :class:`SkipSample`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise SkipSample('decompression_bomb', f'{width}x{height} > {max_pixels} pixels')
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SkipSample('decompression_bomb', str(err)) from err
    except UnidentifiedImageError as err:  # an image signature with garbage after it is corrupt
        reason = 'corrupt' if data.startswith(_IMAGE_MAGIC) or data[8:12] == b'WEBP' else 'not_an_image'
        raise SkipSample(reason, str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = 'truncated' if 'truncat' in str(err).lower() else 'corrupt'
        raise SkipSample(reason, str(err)) from err
    return image


def render_svg(data: bytes, width: int) -> bytes:
    """Render SVG bytes to PNG bytes ``width`` pixels wide (height keeps the aspect ratio).

    Raises:
        SkipSample: ``corrupt`` when the SVG cannot be parsed or rendered.
    """
    import cairosvg  # imported here: only SVG sources need cairo

    try:
        return cairosvg.svg2png(bytestring=data, output_width=width, unsafe=False)
    except (SyntaxError, ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError,
            MemoryError, OSError) as err:
        raise SkipSample('corrupt', f'svg: {type(err).__name__}: {err}') from err


def render_svg_rgb(data: bytes, width: int, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Render SVG bytes straight to an RGB image ``width`` pixels wide, on an opaque ``background``.

    The same drawing as :func:`render_svg` (cairosvg at 96 dpi), without its PNG round trip: the pixels are read
    from cairo's image surface, which cairosvg fills with ``background`` before drawing, so no alpha compositing
    is left to do either. PNG-compressing the rendering and decoding it again was most of the time ``svg2png``
    took per emoji here (bench/data.py measures the converter against a plain ``svg2png`` loop).

    Raises:
        SkipSample: ``corrupt`` when the SVG cannot be parsed or rendered.
    """
    from cairosvg.parser import Tree
    from cairosvg.surface import PNGSurface

    try:
        tree = Tree(bytestring=data, unsafe=False)
        # output=None: PNGSurface draws into a cairo ARGB32 image surface and finish() writes no PNG
        surface = PNGSurface(tree, None, 96, output_width=width, background_color='rgb({},{},{})'.format(*background))
        canvas = surface.cairo
        canvas.flush()
        size, stride = (canvas.get_width(), canvas.get_height()), canvas.get_stride()
        # cairo stores each pixel as a native-endian 32-bit ARGB word: B, G, R, A in memory on little-endian
        raw = 'BGRX' if sys.byteorder == 'little' else 'XRGB'
        image = Image.frombuffer('RGB', size, bytes(canvas.get_data()), 'raw', raw, stride, 1)
        surface.finish()
    except (SyntaxError, ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError,
            MemoryError, OSError) as err:
        raise SkipSample('corrupt', f'svg: {type(err).__name__}: {err}') from err
    if min(size) < 1:
        raise SkipSample('corrupt', f'svg: empty rendering {size[0]}x{size[1]}')
    return image


def sanitize_image(data: bytes,
                   *,
                   svg: bool = False,
                   min_size: int = 64,
                   max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_side: int | None = None,
                   background: tuple[int, int, int] = (255, 255, 255)) -> CleanImage:
    """Decode image bytes into a clean, upright RGB image, or raise :class:`SkipSample`.

    Handles zero-byte, non-image, corrupt and truncated files, decompression bombs (checked from
    the header before any pixel is decoded), EXIF orientation, palette / LA / RGBA / CMYK / 16-bit
    modes, and a minimum size on the shorter side.

    Args:
        data: The raw file bytes.
        svg: The bytes are an SVG document: render it (cairosvg) ``max_side`` (default 512) pixels
            wide first. ``width``/``height`` then describe the rendering.
        min_size: Minimum length in pixels of the shorter side of the source image (for an SVG,
            of its rendering, and at most 16).
        max_pixels: Largest accepted ``width * height`` of the source image.
        max_side: When given, the result is downscaled (Lanczos) so its longer side is at most this.
        background: RGB colour transparent pixels are composited onto.

    Returns:
        The cleaned image with the source's upright size and sha256.

    Raises:
        SkipSample: With reason ``empty_file``, ``not_an_image``, ``corrupt``, ``truncated``,
            ``decompression_bomb`` or ``too_small``.
    """
    if not data:
        raise SkipSample('empty_file')
    sha = hashlib.sha256(data).hexdigest()
    if svg:
        rgb = render_svg_rgb(data, max_side or 512, background)
        width, height = rgb.size
        if width * height > max_pixels:
            raise SkipSample('decompression_bomb', f'svg rendering {width}x{height} > {max_pixels} pixels')
    else:
        image = _decode(data, max_pixels)
        try:
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image, background)
        except (OSError, ValueError, SyntaxError) as err:
            raise SkipSample('corrupt', str(err)) from err
    width, height = rgb.size
    if min(width, height) < (min(min_size, 16) if svg else min_size):  # vectors have no native size
        raise SkipSample('too_small', f'{width}x{height} < {min_size}')
    if max_side is not None and max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return CleanImage(image=rgb, width=width, height=height, sha256=sha)


def encode_image(image: Image.Image, fmt: str = 'jpeg', quality: int = 90) -> bytes:
    """Encode an RGB image as JPEG (``quality``) or PNG bytes, ready for an MDS ``jpeg``/``png`` column."""
    buffer = io.BytesIO()
    if fmt == 'jpeg':
        image.save(buffer, format='JPEG', quality=quality, optimize=False)
    elif fmt == 'png':
        image.save(buffer, format='PNG', compress_level=6)
    else:
        raise ValueError(f'image format must be jpeg or png, got {fmt!r}')
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
_FILE_LIKE = re.compile(
    r'\.(png|jpe?g|svg|gif|tiff?|bmp|webp)\b'  # a file extension
    r'|\b\w*_\w*\b'  # snake_case or numbered tokens such as arrow08_4, IMG_1234
    r'|\b[a-z]+[A-Z]\w*\b'  # camelCase tokens
    r'|^\W*\w*\d{3,}\w*\W*$')  # a lone token with a long number
_GENERIC_TITLE = re.compile(r'\bpart of the\b.*\bcollection\b', re.I)  # "Part of the Flat Icon Collection (...)"
_WEAK_WORDS = {'svg', 'clipart', 'cliparts', 'clip', 'art', 'icon', 'icons', 'image', 'img', 'picture',
               'untitled', 'drawing', 'collection', 'gradient', 'gradients', 'sample', 'test', 'symbol',
               'logo', 'set', 'dsc', 'photo', 'pattern', 'button', 'buttons', 'various', 'misc', 'new',
               'the', 'a', 'an', 'of', 'by', 'and'}


def clean_caption(raw: str | bytes | None) -> str:
    """Decode (UTF-8 only) and normalise whitespace of a caption.

    Raises:
        SkipSample: ``caption_not_utf8`` for bytes that are not UTF-8, ``empty_caption`` for a
            missing or blank caption.
    """
    if raw is None:
        raise SkipSample('empty_caption')
    if isinstance(raw, bytes):
        try:
            raw = raw.decode('utf-8')
        except UnicodeDecodeError as err:
            raise SkipSample('caption_not_utf8', str(err)) from err
    text = ' '.join(raw.replace('\x00', ' ').split())
    if not text:
        raise SkipSample('empty_caption')
    return text


def is_weak_caption(caption: str, min_words: int = 2, min_chars: int = 8) -> bool:
    """Whether a caption is too poor to train on and should be replaced by a captioner.

    Weak: empty, shorter than ``min_words`` words or ``min_chars`` characters, file-name-like
    (``dog_01.png``, ``IMG_1234``, ``camelCaseName``), or made only of generic words such as
    "SVG Gradient Collection" or "clipart icon".
    """
    text = caption.strip()
    words = re.findall(r"[A-Za-z']+", text)
    if len(words) < min_words or len(text) < min_chars:
        return True
    if _FILE_LIKE.search(text) or _GENERIC_TITLE.search(text):
        return True
    return all(w.lower() in _WEAK_WORDS for w in words)
