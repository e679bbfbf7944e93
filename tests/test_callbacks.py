"""The diffusion callbacks through real short ``Trainer.fit`` runs of the tiny config: the labelled sample grid with
EMA weights (composer's EMA with a delayed start), MFU through composer's SpeedMonitor, gradient-norm and latent
statistics, the non-finite loss stop, and tracking in a local MLflow file store read back with mlflow's client.

One monitored fit (6 batches) is shared by most tests."""
import copy
from pathlib import Path

import pytest
import torch
from composer.core import Callback

from diffusion.config import load_config
from diffusion.training.train import build_trainer
from test_train import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ['a cat', 'an astronaut']
PARAM = 'backbone.unet.conv_in.weight'


class _Recorder(Callback):
    """Records one backbone weight (the training weights) and whether EMA has started, after every batch."""

    def __init__(self):
        self.weights, self.ema_started = [], []

    def batch_end(self, state, logger):
        ema = next(a for a in state.algorithms if type(a).__name__ == 'EMA')
        self.weights.append(dict(state.model.named_parameters())[PARAM].detach().clone())
        self.ema_started.append(ema.ema_started)


def _callback(trainer, cls_name):
    return next(c for c in trainer.state.callbacks if type(c).__name__ == cls_name)


def _metrics(trainer):
    from composer.loggers import InMemoryLogger
    mem = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return mem.data


@pytest.fixture(scope='module')
def monitored_run(demo_photos, tmp_path_factory):
    out = tmp_path_factory.mktemp('monitored')
    mlruns = out / 'mlruns'
    over = tiny_overrides(demo_photos, out, max_duration='6ba', eval_interval='3ba', save_interval='100ba') + [
        'save_folder=null',
        'callbacks.sample_images.every_n_batches=3', f'callbacks.sample_images.prompts=[{",".join(PROMPTS)}]',
        'callbacks.mfu_monitor.window_size=2', 'callbacks.diffusion_stats.interval=1',
        'callbacks.nonfinite_loss_monitor={}', 'callbacks.scheduled_gc.batch_interval=2',
        'algorithms.ema.half_life=null', 'algorithms.ema.smoothing=0.5', 'algorithms.ema.ema_start=4ba',
        'algorithms.ema.update_interval=1ba',
        f'loggers.mlflow.tracking_uri={mlruns.as_uri()}', 'loggers.mlflow.experiment_name=h11-test',
        'loggers.mlflow.log_system_metrics=false',
    ]
    trainer = build_trainer(load_config(REPO / 'yamls/tiny-cpu.yaml', over))
    recorder = _Recorder()
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    trainer.close()  # flushes the MLflow logger
    return trainer, recorder, out, mlruns


def test_sample_grid_every_n_batches_and_at_end_labelled(monitored_run):
    trainer, _, out, _ = monitored_run
    cb = _callback(trainer, 'SampleImages')
    assert [p.name for p in cb.saved] == ['ba3.png', 'ba6.png']
    from PIL import Image
    with Image.open(cb.saved[-1]) as im:
        # One row of two 64 px images with 2 px padding, and the label lines under them.
        assert im.size == (2 * 68, 68 + 3 * 11)
        label_strip = torch.tensor(list(im.convert('L').getdata())).view(im.size[1], im.size[0])[68:]
    assert (label_strip < 128).any(), 'no prompt text under the images'


def test_ema_delayed_start_and_grid_uses_ema_weights(monitored_run):
    trainer, recorder, _, _ = monitored_run
    ema = next(a for a in trainer.state.algorithms if type(a).__name__ == 'EMA')
    # Not started before batch 4; the grid at batch 3 therefore shows the training weights, the final one EMA.
    assert recorder.ema_started == [False, False, False, True, True, True]
    cb = _callback(trainer, 'SampleImages')
    assert cb.weights_used == ['training', 'ema']
    # Averaged after the start: EMA restarts from the batch-4 weights, then e = s*e + (1-s)*w with s = 0.5.
    w = recorder.weights
    expected = 0.5 * (0.5 * w[3] + 0.5 * w[4]) + 0.5 * w[5]
    assert not ema.ema_weights_active
    ema_params = ema.ema_model.named_parameters_dict
    torch.testing.assert_close(ema_params[PARAM], expected)
    model = trainer.state.model
    assert torch.equal(dict(model.named_parameters())[PARAM], w[5]), 'EMA must not change the training weights'
    # The final grid is what the EMA weights generate, not the training weights.
    ema_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in ema_model.named_parameters():
            if name in ema_params:
                param.copy_(ema_params[name])
    ema_model.eval()
    model.eval()
    torch.testing.assert_close(cb.generate(ema_model).float(), cb.last_images, atol=1e-5, rtol=0)
    assert not torch.allclose(cb.generate(model).float(), cb.last_images, atol=1e-3)


def test_mfu_and_statistics_logged(monitored_run):
    trainer, _, _, _ = monitored_run
    data = _metrics(trainer)
    flops_per_sample = data['throughput/flops_per_sample'][-1][1]
    peak = data['throughput/device/peak_flops'][-1][1]
    assert flops_per_sample > 1e8 and peak > 1e9  # mini UNet step: GFLOPs; any CPU: > 1 GFLOP/s
    mfu = data['throughput/device/mfu'][-1][1]
    flops_per_sec = data['throughput/device/flops_per_sec'][-1][1]
    assert 0 < mfu and mfu == pytest.approx(flops_per_sec / peak)
    samples_per_sec = data['throughput/device/samples_per_sec'][-1][1]
    assert flops_per_sec == pytest.approx(flops_per_sample * samples_per_sec, rel=1e-3)
    for key in ('grad_norm/global', 'latents/mean', 'latents/std', 'latents/abs_max'):
        values = [float(v) for _, v in data[key]]
        assert len(values) == 6 and all(torch.isfinite(torch.tensor(values)))
    assert all(float(v) > 0 for _, v in data['grad_norm/global'])


def test_mlflow_file_store_has_metrics_config_and_grids(monitored_run):
    trainer, _, _, mlruns = monitored_run
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=mlruns.as_uri())
    experiment = client.get_experiment_by_name('h11-test')
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == 'FINISHED'
    assert 'loss/train/total' in run.data.metrics and 'metrics/eval/ValidationLoss' in run.data.metrics
    history = client.get_metric_history(run.info.run_id, 'loss/train/total')
    assert sorted(m.step for m in history) == list(range(6))  # composer logs at the 0-based batch index
    assert run.data.params['model.backbone.preset'] == 'mini-s'
    assert run.data.params['algorithms.ema.ema_start'] == '4ba'
    images = [a.path for a in client.list_artifacts(run.info.run_id, 'images')]
    assert len(images) >= 2, images  # the grids at batch 3 and 6 (one image file + metadata each)


class _InjectNaN(Callback):
    """Turns one backbone weight into NaN before batch ``at`` (0-based), so that batch's loss is NaN."""

    def __init__(self, at):
        self.at = at

    def batch_start(self, state, logger):
        if int(state.timestamp.batch) == self.at:
            with torch.no_grad():
                dict(state.model.named_parameters())[PARAM].fill_(float('nan'))


def test_nonfinite_loss_stops_the_run_naming_step_and_loss(demo_photos, tmp_path):
    from diffusion.callbacks.nonfinite_monitor import NonFiniteLossError
    over = tiny_overrides(demo_photos, tmp_path, max_duration='4ba', eval_interval='10ba') + [
        'save_folder=null', 'callbacks.nonfinite_loss_monitor={}', 'eval_first=false']
    trainer = build_trainer(load_config(REPO / 'yamls/tiny-cpu.yaml', over))
    trainer.state.callbacks.insert(0, _InjectNaN(at=2))
    with pytest.raises(NonFiniteLossError, match=r'at batch 2 .*total=nan'):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2  # stopped in the third batch, before its optimizer step
    trainer.close()
