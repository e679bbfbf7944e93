"""Parallel conversion: :func:`run_conversion` runs a converter's per-item function over worker processes and
hands the results to a :class:`~diffusion.data.writer.DatasetWriter` in input order."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

from tqdm import tqdm

from diffusion.data.sanitize import SkipSample
from diffusion.data.writer import DatasetWriter

log = logging.getLogger(__name__)


def _guarded(fn: Callable[[Any], dict[str, Any]], item: Any) -> tuple[str, Any]:
    """Run ``fn`` in a worker; a bad item becomes ('skip', (reason, detail)) instead of killing the run."""
    try:
        return 'ok', fn(item)
    except SkipSample as err:
        return 'skip', (err.reason, err.detail)
    except Exception as err:  # noqa: BLE001 - one broken file must never end the run
        log.warning('unexpected error on %r: %s: %s', item, type(err).__name__, err)
        return 'skip', (f'error_{type(err).__name__}', str(err))


_WORKER_FN: Callable[[Any], dict[str, Any]] | None = None  # set before forking; inherited by workers


def _call_worker_fn(item: Any) -> tuple[str, Any]:
    assert _WORKER_FN is not None
    return _guarded(_WORKER_FN, item)


def run_conversion(fn: Callable[[Any], dict[str, Any]],
                   items: Sequence[Any],
                   writer: DatasetWriter,
                   *,
                   key: Callable[[Any], str],
                   source: Callable[[Any], str] = lambda item: '',
                   split: Callable[[Any], str | None] = lambda item: None,
                   name: Callable[[Any], str] = lambda item: '',
                   workers: int = 1,
                   desc: str = 'convert',
                   chunksize: int | None = None) -> None:
    """Convert ``items`` with ``fn`` over ``workers`` processes and write them in input order.

    ``fn(item)`` returns a sample dict or raises :class:`SkipSample`. Items whose key the writer
    already holds are not re-processed. A skipped item is recorded with ``name(item)`` (the file the user
    knows it by), its reason and the error's detail. Output order does not depend on ``workers``. ``chunksize``
    (items sent to a worker at once) defaults to about 1/32 of a worker's share, at most 16: per-item costs vary
    a hundredfold between sources (a large SVG against a 64 px PNG), and big chunks leave one worker
    finishing a chunk of slow items alone at the end, while sending an item costs well under a millisecond.
    """
    global _WORKER_FN
    pending = [item for item in items if not writer.done(key(item))]
    _WORKER_FN = fn  # forked workers inherit it, so ``fn`` need not be picklable
    bar = tqdm(total=len(pending), desc=desc, unit='img', dynamic_ncols=True)
    pool = None
    try:
        if workers > 1:
            import multiprocessing
            # fork, so ``fn`` need not be picklable. Call this from a process that has not yet run torch's thread
            # pools (the convert/ CLIs): forking after threads have started can deadlock the children.
            pool = multiprocessing.get_context('fork').Pool(workers)
            chunk = chunksize or max(1, min(16, len(pending) // (32 * workers)))
            results: Iterable[tuple[str, Any]] = pool.imap(_call_worker_fn, pending, chunksize=chunk)
        else:
            results = map(_call_worker_fn, pending)
        for item, (status, value) in zip(pending, results):
            if status == 'ok':
                writer.write(value, split=split(item))
            else:
                reason, detail = value
                writer.skip(reason, key=key(item), source=source(item), name=name(item), detail=detail)
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        _WORKER_FN = None
