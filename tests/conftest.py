"""Shared fixtures. No model hub is reachable here: every test runs offline."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
if os.environ.get('PYTEST_XDIST_WORKER'):  # `make test` runs two workers on two cores: one thread each, and
    os.environ.setdefault('OMP_NUM_THREADS', '1')  # for the processes the tests start

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def repo() -> Path:
    return REPO


@pytest.fixture(scope='session')
def demo_photos(tmp_path_factory) -> Path:
    """The small MDS set of real photos (train + eval splits) the tiny configs train on."""
    from diffusion.demo.photos import build_demo_photos
    return Path(build_demo_photos(tmp_path_factory.mktemp('demo_photos')))


@pytest.fixture(scope='session', autouse=True)
def _one_thread_per_worker():
    """Under pytest-xdist each worker trains with one torch thread (the workers share the machine's cores)."""
    if os.environ.get('PYTEST_XDIST_WORKER'):
        import torch
        torch.set_num_threads(1)


@pytest.fixture(scope='session', autouse=True)
def _registered_components():
    """Register every model, schedule, dataloader and callback by name, as run.py does."""
    from diffusion.builders import import_components
    import_components()


@pytest.fixture(scope='module', autouse=True)
def _release_streaming_shared_memory():
    """Close and unlink the shared-memory blocks a test module's streaming datasets opened, when the module ends.

    streaming registers ``atexit`` cleanup for every ``SharedMemory`` a dataset opens; the registration keeps the
    block (a /dev/shm file handle) alive until the process exits, so a long pytest process runs out of file
    handles. Datasets do not outlive the module that built them (no session fixture holds one), so the blocks
    opened during a module are released at its end, and their exit handlers with them.
    """
    import atexit
    import gc
    import warnings

    from streaming.base.shared import SharedMemory

    def blocks() -> list[SharedMemory]:
        # isinstance reads __class__ of every live object, and some objects warn when read (torch's deprecated
        # reduce_op: a FutureWarning, an error in modules that turn warnings into errors)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return [o for o in gc.get_objects() if isinstance(o, SharedMemory)]

    before = {id(o) for o in blocks()}
    yield
    gc.collect()
    for obj in blocks():
        if id(obj) not in before:
            atexit.unregister(obj.cleanup)
            try:
                obj.cleanup()
            except BufferError:  # an array still views the block: it is released at exit as before
                atexit.register(obj.cleanup)
