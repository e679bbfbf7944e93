"""The console during training: one line per logged batch (diffusion/training/console.py), every metric in the
run's log. A full ``run.py`` run is checked in tests/test_run_setup.py; here a tiny composer model trains in a
second."""
import io
import logging
import re

import pytest
import torch
from composer import Trainer
from composer.callbacks import LRMonitor
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

from diffusion.training.console import METRICS_LOG, CompactConsoleLogger

TRAIN_LINE = re.compile(r'^\[batch (\d+)/6\] loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| \d+\.\d samples/s \| '
                        r'\d+:\d\d:\d\d$')
EVAL_LINE = re.compile(r'^\[eval at batch (\d+)/6\] CrossEntropy \d+\.\d{4} \| MulticlassAccuracy \d\.\d{4}$')


def _loader(n: int = 16) -> DataLoader:
    data = TensorDataset(torch.randn(n, 4, generator=torch.Generator().manual_seed(n)), torch.arange(n) % 2)
    return DataLoader(data, batch_size=2)


def _fit(console: CompactConsoleLogger, **kwargs) -> None:
    torch.manual_seed(0)
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    trainer = Trainer(model=model, train_dataloader=_loader(), eval_dataloader=_loader(4), loggers=[console],
                      callbacks=[LRMonitor()], optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
                      log_to_console=False, progress_bar=False, device='cpu', **kwargs)
    trainer.fit()
    trainer.close()


@pytest.fixture
def metrics_log():
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    METRICS_LOG.addHandler(handler)
    yield records
    METRICS_LOG.removeHandler(handler)


def test_one_line_per_logged_batch_and_per_evaluation(metrics_log, capsys):
    out = io.StringIO()
    _fit(CompactConsoleLogger('2ba', stream=out), max_duration='6ba', eval_interval='3ba')
    lines = out.getvalue().splitlines()
    train = [int(m.group(1)) for m in map(TRAIN_LINE.match, lines) if m]
    evals = [int(m.group(1)) for m in map(EVAL_LINE.match, lines) if m]
    assert train == [1, 2, 4, 6], lines  # the first batch, then every second
    assert evals == [3, 6], lines
    assert len(lines) == len(train) + len(evals), lines  # nothing else: no per-metric lines
    # The full metrics of each line are in the run's log (diffusion.metrics), not on the console.
    assert len(metrics_log) == len(lines)
    assert all('loss/train/total=' in r and 'lr-SGD/group0=' in r and 'time/batch=' in r
               for r in metrics_log if r.startswith('train '))
    assert sum('metrics/eval/MulticlassAccuracy=' in r for r in metrics_log) == 2
    captured = capsys.readouterr()
    assert 'loss/train/total' not in captured.out + captured.err


def test_epoch_interval_and_last_batch(metrics_log):
    out = io.StringIO()
    _fit(CompactConsoleLogger('1ep', stream=out), max_duration='2ep', eval_interval='1ep')
    lines = out.getvalue().splitlines()
    train = [line for line in lines if not line.startswith('[eval')]
    assert [line.split(']')[0] for line in train] == ['[epoch 1/2, batch 8', '[epoch 2/2, batch 16'], lines


def test_batch_interval_prints_the_last_batch_too():
    out = io.StringIO()
    _fit(CompactConsoleLogger('4ba', stream=out), max_duration='6ba', eval_interval='10ba')
    assert [line.split(']')[0] for line in out.getvalue().splitlines()] == ['[batch 1/6', '[batch 4/6',
                                                                           '[batch 6/6', '[eval at batch 6/6']


def test_iteration_intervals_are_refused():
    with pytest.raises(ValueError, match='batches or epochs'):
        CompactConsoleLogger('100sp')
