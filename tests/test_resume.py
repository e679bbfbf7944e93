"""Kill-safe training: SIGKILL mid-epoch, the same command again, bit-identical final weights; corrupt checkpoints."""
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion.training.checkpointing import checkpoint_is_complete, repair_latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


def command(data: Path, out: Path) -> list[str]:
    """One tiny run: 20 photos at batch 4 = 5 batches an epoch, so checkpoints at 3, 6, 9 are mid-epoch."""
    return ['yamls/tiny-cpu.yaml', f'variables.data={data}', 'variables.run_name=resume', f'save_folder={out}',
            f'callbacks.sample_images.folder={out}/samples', 'callbacks.sample_images.num_inference_steps=2',
            'global_train_batch_size=4', 'device_eval_batch_size=4', 'max_duration=10ba', 'save_interval=3ba',
            'eval_interval=5ba', 'eval_first=false', 'console_log_interval=1ba', 'autoresume=true',
            'save_overwrite=false', 'save_num_checkpoints_to_keep=2', 'deterministic_mode=true']


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = torch.load(folder / 'latest-rank0.pt', map_location='cpu', weights_only=False)
    assert int(state['state']['timestamp']['Timestamp']['batch']) == 10
    return state['state']['model']


@pytest.fixture()
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.integration
def test_sigkill_mid_epoch_then_same_command_gives_identical_weights(demo_photos, tmp_path, monkeypatch,
                                                                     restore_determinism):
    monkeypatch.chdir(REPO)
    ref, killed = tmp_path / 'ref', tmp_path / 'killed'
    # Every run in a process of its own, as a user runs the command (nothing an earlier test left in this one);
    # one thread each, so that the uninterrupted reference and the run to be killed train side by side.
    env = dict(os.environ, OMP_NUM_THREADS='1')

    def start(out: Path) -> subprocess.Popen:
        log = open(tmp_path / f'{out.name}.log', 'a')  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen([sys.executable, 'run.py', *command(demo_photos, out)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    def finish(proc: subprocess.Popen, out: Path) -> None:
        assert proc.wait(timeout=600) == 0, (tmp_path / f'{out.name}.log').read_text()[-3000:]

    reference = start(ref)
    # streaming names each job's shared memory after the first free prefix: two jobs opening their datasets in
    # the same instant can pick the same one (FileExistsError). The second starts once the first has its Trainer.
    deadline = time.time() + 300
    while 'Run name:' not in (tmp_path / 'ref.log').read_text() and reference.poll() is None \
            and time.time() < deadline:
        time.sleep(0.1)
    # The same run, killed with SIGKILL as soon as its first (mid-epoch) checkpoint exists.
    proc = start(killed)
    deadline = time.time() + 300
    while not (killed / 'latest-rank0.pt').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, 'the run ended before it could be killed: ' + (
        tmp_path / 'killed.log').read_text()[-3000:]
    first = os.readlink(killed / 'latest-rank0.pt')
    assert 'ba10' not in first, first

    finish(start(killed), killed)  # the same command resumes from the last checkpoint
    finish(reference, ref)
    a, b = final_weights(ref), final_weights(killed)
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff == 0.0, f'resumed weights differ from the uninterrupted run by up to {diff}'
    # save_num_checkpoints_to_keep: 2 is honoured by both runs.
    for folder in (ref, killed):
        assert sorted(p.name for p in folder.glob('ep*-ba*-rank0.pt')) == ['ep1-ba10-rank0.pt', 'ep1-ba9-rank0.pt']


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    good, bad = tmp_path / 'ep1-ba6-rank0.pt', tmp_path / 'ep1-ba9-rank0.pt'
    torch.save({'state': {'x': torch.arange(1000)}}, good)
    torch.save({'state': {'x': torch.arange(1000) * 2}}, bad)
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # killed mid-write by a writer that was not atomic
    (tmp_path / '.tmp-123-ep1-ba12-rank0.pt').write_bytes(b'half')  # an unfinished atomic write
    os.symlink(bad.name, tmp_path / 'latest-rank0.pt')
    assert checkpoint_is_complete(good) and not checkpoint_is_complete(bad)
    with caplog.at_level(logging.WARNING):
        chosen = repair_latest_checkpoint(str(tmp_path))
    assert chosen == good
    assert os.readlink(tmp_path / 'latest-rank0.pt') == good.name
    assert (tmp_path / 'ep1-ba9-rank0.pt.corrupt').exists() and not bad.exists()
    assert not list(tmp_path.glob('.tmp-*'))
    assert 'truncated or corrupt' in caplog.text
    # A byte flipped inside a record is caught by the CRC check too.
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    good.write_bytes(bytes(raw))
    assert not checkpoint_is_complete(good)
    assert repair_latest_checkpoint(str(tmp_path)) is None
    assert not (tmp_path / 'latest-rank0.pt').is_symlink()


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from composer.utils import checkpoint as composer_checkpoint

    from diffusion.training.composer_compat import install_atomic_checkpoint_writes
    install_atomic_checkpoint_writes()
    target = tmp_path / 'ep0-ba1-rank0.pt'
    target.write_bytes(b'old')

    def dying_save(obj, f):  # the process dies halfway through torch.save
        f.write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        composer_checkpoint._write_checkpoint_file({'x': 1}, str(target))
    assert target.read_bytes() == b'old', 'a half-written file took the final name'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ep0-ba1-rank0.pt']


def test_large_checkpoint_check_reads_record_headers_not_tensor_data(tmp_path):
    """Finding 9: rank 0 checked a 12-16 GB checkpoint by CRC of every byte while the other ranks waited against the
    dist timeout. Above `full_check_bytes` (1 GB) the check reads the zip's central directory and each record's
    local header only: a truncated file or a broken record is still caught, tensor bytes are not read."""
    import zipfile
    path = tmp_path / 'ep1-ba6-rank0.pt'
    torch.save({'state': {'x': torch.arange(100_000), 'y': torch.ones(50_000)}}, path)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)  # the largest tensor's storage
    with open(path, 'rb') as f:  # its data starts after the 30-byte local header, the name and the extra field
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), 'little'), int.from_bytes(f.read(2), 'little')
    data_start = info.header_offset + 30 + name_len + extra_len
    structural = {'full_check_bytes': 0}  # what a file over the limit gets
    assert checkpoint_is_complete(path) and checkpoint_is_complete(path, **structural)

    def variant(data: bytes) -> Path:
        path.write_bytes(data)
        return path
    # A flipped bit inside tensor data: only the full check (CRCs) reads those bytes.
    flipped = bytearray(raw)
    flipped[data_start + info.compress_size // 2] ^= 0xFF
    assert not checkpoint_is_complete(variant(bytes(flipped)))
    assert checkpoint_is_complete(variant(bytes(flipped)), **structural)
    # A broken record header, a truncated file, bytes lost in the middle: caught without reading the data.
    broken = bytearray(raw)
    broken[info.header_offset:info.header_offset + 4] = b'XXXX'
    assert not checkpoint_is_complete(variant(bytes(broken)), **structural)
    assert not checkpoint_is_complete(variant(raw[:len(raw) - 100]), **structural)
    assert not checkpoint_is_complete(variant(raw[:data_start] + raw[data_start + 4096:]), **structural)
    # repair_latest_checkpoint passes the limit on: the file over it is kept, the broken one set aside.
    variant(bytes(flipped))
    assert repair_latest_checkpoint(str(tmp_path), full_check_bytes=0) == path
    variant(bytes(broken))
    assert repair_latest_checkpoint(str(tmp_path), full_check_bytes=0) is None
    assert (tmp_path / 'ep1-ba6-rank0.pt.corrupt').exists()
