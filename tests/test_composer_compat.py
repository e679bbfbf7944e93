"""The patches of composer internals are pinned: a version change fails here first, loudly."""
import pytest

from diffusion.training import composer_compat


def test_installed_versions_are_the_pinned_ones():
    composer_compat.check_pins()


def test_a_version_change_is_refused(monkeypatch):
    monkeypatch.setitem(composer_compat.PINNED, 'mosaicml', '0.0.1')
    with pytest.raises(RuntimeError, match='re-read the patched functions'):
        composer_compat.check_pins()
