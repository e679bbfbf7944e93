"""Shared fixtures. No model hub is reachable here: every test runs offline."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def repo() -> Path:
    return REPO


@pytest.fixture(scope='session')
def demo_photos(tmp_path_factory) -> Path:
    """The small MDS set of real photos (train + eval splits) the tiny configs train on."""
    from diffusion.data import build_demo_photos
    return Path(build_demo_photos(tmp_path_factory.mktemp('demo_photos')))


@pytest.fixture(scope='session', autouse=True)
def _registered_components():
    """Register every model, schedule, dataloader and callback by name, as run.py does."""
    from diffusion.builders import import_components
    import_components()
