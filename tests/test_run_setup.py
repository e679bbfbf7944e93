"""run.py around the Trainer: threads per process, a guarded run folder, a quiet log kept on disk, TensorBoard."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.config import ConfigError, load_config, save_config
from diffusion.training.run_setup import check_run_folder, set_process_threads, threads_per_process
from diffusion.training.train import main

REPO = Path(__file__).resolve().parents[1]


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A short tiny-cpu run whose record is ``out`` (checkpoints in ``out/checkpoints``)."""
    return ['yamls/tiny-cpu.yaml', f'variables.data={data}', 'variables.run_name=guarded',
            f'save_folder={out}/checkpoints', f'callbacks.sample_images.folder={out}/samples',
            'callbacks.sample_images.num_inference_steps=2', 'callbacks.sample_images.prompts=[a cat]',
            'max_duration=4ba', 'eval_interval=2ba', 'save_interval=2ba', 'console_log_interval=2ba', *extra]


_LOG_RECORD = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) \S+: ')


def console_problems(out: str, logged: list[int], total: int, evaluated: list[int]) -> list[str]:
    """What is wrong with a run's console output: a logged batch not on exactly one line (loss, lr, throughput,
    time), an evaluation not on one line, a warning, or any line other than python log records, those lines and
    the end-of-run summary."""
    problems, lines = [], out.splitlines()
    train = [line for line in lines if line.startswith('[batch ')]
    if [line.split(']')[0] for line in train] != [f'[batch {b}/{total}' for b in logged]:
        problems.append(f'train lines {train} are not one per logged batch {logged}')
    problems += [f'incomplete: {line}' for line in train if not re.fullmatch(
        r'\[batch \d+/\d+\] loss \d+\.\d{4} \| lr \S+ \| \d+\.\d samples/s \| \d+:\d\d:\d\d', line)]
    evals = [line for line in lines if line.startswith('[eval at batch ')]
    if [line.split(']')[0] for line in evals] != [f'[eval at batch {b}/{total}' for b in evaluated]:
        problems.append(f'eval lines {evals} are not one per evaluation at {evaluated}')
    for line in lines:
        if re.match(r'run \S+: \d+ batches|  (\S+ at batch \d+: |last checkpoint: |summary: )', line):
            continue  # the end-of-run summary
        record = _LOG_RECORD.match(line)
        if (record and record.group(1) in ('WARNING', 'ERROR', 'CRITICAL')) or re.search('warn', line, re.I):
            problems.append(f'warning: {line}')
        elif not record and line not in train and line not in evals:
            problems.append(f'stray line: {line!r}')
    return problems


@pytest.mark.parametrize('cpus,local,expected', [(2, 1, 2), (2, 2, 1), (2, 3, 1), (16, 3, 5), (1, 4, 1), (8, 0, 8)])
def test_threads_per_process(cpus, local, expected):
    assert threads_per_process(cpus, local) == expected


def test_threads_set_from_local_world_size_unless_omp_is_set(caplog):
    before = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0))
    try:
        with caplog.at_level('INFO'):
            assert set_process_threads({'LOCAL_WORLD_SIZE': '2'}) == max(1, cpus // 2)
        assert torch.get_num_threads() == max(1, cpus // 2)
        assert f'{max(1, cpus // 2)} per process ({cpus} cores / 2 processes' in caplog.text
        torch.set_num_threads(1)
        assert set_process_threads({'LOCAL_WORLD_SIZE': '1', 'OMP_NUM_THREADS': '1'}) == 1  # the user's choice
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_new_run_over_a_run_with_other_settings_stops(demo_photos, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    first = load_config(REPO / 'yamls/tiny-cpu.yaml', run_args(demo_photos, tmp_path)[1:] + ['max_duration=60ba'])
    save_config(first, tmp_path / 'checkpoints' / 'config.yaml')  # the record an earlier 60-batch run left
    (tmp_path / 'checkpoints' / 'ep0-ba60-rank0.pt').write_bytes(b'')
    # A 4-batch test under the same name: one line, exit 2, nothing trained or replaced.
    assert main(run_args(demo_photos, tmp_path)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('config error:')]
    assert len(lines) == 1 and 'max_duration' in lines[0] and 'run_name=' in lines[0], err
    assert 'save_overwrite=true' in lines[0] and 'autoresume' in lines[0]
    assert not (tmp_path / 'summary.json').exists() and not (tmp_path / 'samples').exists()
    # The ways on: resume it, the same settings, a new run name, or say overwrite on the command line.
    same = load_config(REPO / 'yamls/tiny-cpu.yaml', run_args(demo_photos, tmp_path)[1:] + ['max_duration=60ba'])
    check_run_folder(same, overwrite_asked=False)
    resume = load_config(REPO / 'yamls/tiny-cpu.yaml', run_args(demo_photos, tmp_path)[1:] + ['autoresume=true',
                                                                                               'max_duration=90ba'])
    check_run_folder(resume, overwrite_asked=False)
    check_run_folder(load_config(REPO / 'yamls/tiny-cpu.yaml', run_args(demo_photos, tmp_path)[1:]), True)
    with pytest.raises(ConfigError, match='seed'):  # what is trained differs: not bookkeeping
        check_run_folder(load_config(REPO / 'yamls/tiny-cpu.yaml', run_args(demo_photos, tmp_path)[1:] + [
            'max_duration=60ba', 'seed=3']), overwrite_asked=False)


@pytest.mark.integration
def test_normal_run_log_is_quiet_and_kept_in_the_run_folder(demo_photos, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONWARNINGS', 'OMP_NUM_THREADS')}
    proc = subprocess.run([sys.executable, 'run.py', *run_args(demo_photos, tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert [line for line in out.splitlines() if 'Warning' in line or 'warnings.warn' in line] == []
    assert out.count('was not specified') == 0  # streaming's defaults notices
    assert 'Config:' not in out and out.count('run guarded: model latent_diffusion') == 1  # the short summary
    assert 'torch threads:' in out
    assert console_problems(out, logged=[1, 2, 4], total=4, evaluated=[0, 2, 4]) == []
    log = (tmp_path / 'train.log').read_text()
    for line in ('run guarded: model latent_diffusion', '[batch 2/4] loss ', '[eval at batch 2/4] ValidationLoss',
                 'diffusion.metrics: train batch 2/4: ', 'loss/train/total=', 'lr-DecoupledAdamW/group0=',
                 'diffusion.metrics: eval at batch 2/4: metrics/eval/ValidationLoss=', 'summary: '):
        assert line in log, line
    assert (tmp_path / 'checkpoints' / 'config.yaml').exists()


def test_tensorboard_logger_writes_an_event_file_in_the_run_folder(demo_photos, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.chdir(REPO)
    assert main(run_args(demo_photos, tmp_path, 'max_duration=2ba', 'eval_first=false', 'loggers.tensorboard={}')) == 0
    events = list((tmp_path / 'tensorboard').rglob('events.out.tfevents.*'))
    assert events, list(tmp_path.rglob('*'))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()['scalars']
    assert 'loss/train/total' in tags, tags
    losses = acc.Scalars('loss/train/total')
    assert [e.step for e in losses] == [0, 1] and all(e.value > 0 for e in losses)
