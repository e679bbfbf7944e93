"""Licence normalisation and the licence sets CommonCatalog is split into.

Every converter stores a normalised licence id per sample (``CC-BY-4.0``, ``CC-BY-SA-4.0``,
``CC-BY-NC-2.0``, ``CC0-1.0``, ``public-domain``, ``GPL-2.0``, ...) and keeps or drops the sample by
membership of one of three sets:

- ``commercial``: public domain / CC0, CC-BY and CC-BY-SA (CommonCatalog-C).
- ``noncommercial``: the commercial set plus CC-BY-NC and CC-BY-NC-SA (CommonCatalog-NC).
- ``all``: the non-commercial set plus free-software licences that are not Creative Commons (GPL, BSD).

No-derivatives (ND) licences are in no set: a model trained on an image is treated as a derivative,
as CommonCanvas does. Unknown text normalises to ``unknown`` and is in no set.
"""
from __future__ import annotations

import re

LICENSE_SETS = ('commercial', 'noncommercial', 'all')

# Licence family -> the sets it belongs to.
_FAMILY_SETS: dict[str, frozenset[str]] = {
    'public-domain': frozenset(LICENSE_SETS),
    'cc0': frozenset(LICENSE_SETS),
    'by': frozenset(LICENSE_SETS),
    'by-sa': frozenset(LICENSE_SETS),
    'by-nc': frozenset({'noncommercial', 'all'}),
    'by-nc-sa': frozenset({'noncommercial', 'all'}),
    'gpl': frozenset({'all'}),
    'bsd': frozenset({'all'}),
}

_CC_URL = re.compile(r'creativecommons\.org/licenses/(by[a-z-]*)/(\d(?:\.\d)?)', re.I)
_CC_GPL_URL = re.compile(r'creativecommons\.org/licenses/(l?gpl)/(\d(?:\.\d)?)', re.I)  # CC's old GPL deeds
_CC_SHORT = re.compile(r'\bcc[\s_-]?(by(?:[\s_-](?:nc|sa|nd))*)(?:[\s_-]+v?(\d(?:\.\d)?))?\b', re.I)
_GPL = re.compile(r'\b(?:gnu\s+general\s+public\s+license|gpl)[\s_-]*v?(?:version\s*)?(\d)?', re.I)


def _cc_id(code: str, version: str | None) -> str:
    """Build ``CC-BY-NC-SA-2.0`` from ``by-nc-sa`` and ``2.0`` (parts ordered canonically)."""
    parts = set(re.split(r'[\s_-]+', code.lower())) - {'by', ''}
    ordered = ['BY'] + [p.upper() for p in ('nc', 'nd', 'sa') if p in parts]
    if version and '.' not in version:
        version = f'{version}.0'
    return '-'.join(['CC', *ordered] + ([version] if version else []))


def _from_words(text: str) -> str | None:
    """Flickr/YFCC names such as ``Attribution-NonCommercial-ShareAlike License``."""
    if 'attribution' not in text:
        return None
    code = ['by']
    if 'noncommercial' in text or 'non-commercial' in text:
        code.append('nc')
    if 'noderiv' in text or 'no derivatives' in text:
        code.append('nd')
    if 'sharealike' in text or 'share alike' in text:
        code.append('sa')
    version = re.search(r'\b(\d\.\d)\b', text)
    return _cc_id('-'.join(code), version.group(1) if version else None)


def normalize_license(text: str | None) -> str:
    """Normalise a licence name or URL to a short id.

    Args:
        text: A licence name (``CC BY-SA 4.0``, ``Attribution-NoDerivs License``, ``GPL-2``,
            ``public domain``) or URL (``https://creativecommons.org/licenses/by/2.0/``,
            ``http://web.resource.org/cc/PublicDomain``).

    Returns:
        An id such as ``CC-BY-4.0``, ``CC-BY-NC-SA-2.0``, ``CC0-1.0``, ``public-domain``,
        ``GPL-2.0``, ``all-rights-reserved`` or ``unknown``.
    """
    if not text or not text.strip():
        return 'unknown'
    raw = text.strip()
    low = raw.lower()
    if 'publicdomain/zero' in low or re.search(r'\bcc[\s_-]?0\b|cc-?zero', low):
        return 'CC0-1.0'
    match = _CC_GPL_URL.search(raw)
    if match:
        version = match.group(2) if '.' in match.group(2) else f'{match.group(2)}.0'
        return f'{match.group(1).upper()}-{version}'
    match = _CC_URL.search(raw)
    if match:
        return _cc_id(match.group(1), match.group(2))
    if 'publicdomain' in low.replace(' ', '') or 'public-domain' in low:
        return 'public-domain'
    match = _CC_SHORT.search(raw)
    if match:
        return _cc_id(match.group(1), match.group(2))
    words = _from_words(low)
    if words:
        return words
    match = _GPL.search(raw)
    if match and 'lesser' not in low and 'lgpl' not in low:
        return f'GPL-{match.group(1)}.0' if match.group(1) else 'GPL'
    match = re.search(r'\bbsd[\s_-]*(\d)?', low)
    if match:
        return f'BSD-{match.group(1) or 3}-Clause'
    if 'all rights reserved' in low:
        return 'all-rights-reserved'
    return 'unknown'


def license_family(license_id: str) -> str:
    """Return the family of a normalised id: ``by``, ``by-sa``, ``by-nc``, ``by-nc-sa``, ``nd``,
    ``cc0``, ``public-domain``, ``gpl``, ``bsd`` or ``other``."""
    if license_id == 'CC0-1.0':
        return 'cc0'
    if license_id == 'public-domain':
        return 'public-domain'
    if license_id.startswith(('GPL', 'LGPL')):
        return 'gpl'
    if license_id.startswith('BSD'):
        return 'bsd'
    if license_id.startswith('CC-BY'):
        parts = [p.lower() for p in license_id.split('-')[1:] if not p[0].isdigit()]
        return 'nd' if 'nd' in parts else '-'.join(parts)
    return 'other'


def license_url(license_id: str) -> str:
    """Return the canonical URL of a normalised licence id (empty string when there is none)."""
    family = license_family(license_id)
    if family == 'cc0':
        return 'https://creativecommons.org/publicdomain/zero/1.0/'
    if family == 'public-domain':
        return 'https://creativecommons.org/publicdomain/mark/1.0/'
    if family == 'bsd':
        return 'https://opensource.org/license/bsd-3-clause'
    if family == 'gpl':
        name, _, version = license_id.partition('-')
        return f'https://www.gnu.org/licenses/old-licenses/{name.lower()}-{version or "2.0"}.html'
    if license_id.startswith('CC-BY'):
        parts = license_id.split('-')[1:]
        version = parts[-1] if parts[-1][0].isdigit() else '4.0'
        code = '-'.join(p.lower() for p in parts if not p[0].isdigit())
        return f'https://creativecommons.org/licenses/{code}/{version}/'
    return ''


def in_license_set(license_id: str, license_set: str) -> bool:
    """Whether a normalised licence id belongs to ``commercial``, ``noncommercial`` or ``all``.

    Raises:
        ValueError: If ``license_set`` is not one of :data:`LICENSE_SETS`.
    """
    if license_set not in LICENSE_SETS:
        raise ValueError(f'license_set must be one of {LICENSE_SETS}, got {license_set!r}')
    return license_set in _FAMILY_SETS.get(license_family(license_id), frozenset())
