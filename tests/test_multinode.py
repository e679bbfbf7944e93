"""Two nodes on one machine: two composer launchers (``--world_size 2 --nproc 1 --node_rank 0/1``, one rendezvous at
127.0.0.1) train ``yamls/tiny-cpu.yaml`` together over gloo, each reading the shards through streaming's remote/local
path (a plain directory as the ``remote``, a node-local ``local`` cache).

Streaming takes a host for a node: the ranks of a node coordinate through POSIX shared memory in ``/dev/shm``
named ``<prefix>_locals``, ``<prefix>_barrier``, ... and file locks in the temp directory, and every node's local
leader picks the same first free prefix before a barrier. Two launchers on one host therefore collide
(``FileExistsError: /000051_locals``), whether or not their ``local`` caches differ. So each "node" here runs in
its own IPC and mount namespace, as a real node would have its own kernel: a private tmpfs on ``/dev/shm``, its own
disk bind-mounted at one node-local path (cache, temp directory, ledger), so both nodes run the same command except
``--node_rank``. The checkpoint folder is shared between the nodes, as on a cluster's shared filesystem, with
``autoresume: true`` as the recipes set it: without ``install_node_signal_files`` (diffusion/training/composer_compat.py) node 1
dies at start-up deleting composer's autoresume signal file that node 0 has already deleted. The rendezvous is real:
one gloo group of world size 2 over TCP (the log says ``processes: 2 on 2 nodes``).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_ddp import _ledger  # one reader of the sample ledger

from test_train import tiny_overrides

REPO = Path(__file__).resolve().parents[1]

# Runs as root inside `unshare --ipc --mount`: the node's own /dev/shm and its own disk at the node-local path.
NODE_SETUP = r'''
set -e
mount -t tmpfs -o size=256m,mode=1777 tmpfs /dev/shm
mount --bind "$NODE_DISK" "$NODE_VIEW"
mkdir -p "$NODE_VIEW/tmp"
export TMPDIR="$NODE_VIEW/tmp"
exec "$@"
'''


def _namespaces_available() -> bool:
    if shutil.which('unshare') is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(['unshare', '--ipc', '--mount', '--propagation', 'private', '--', 'sh', '-c',
                            'mount -t tmpfs tmpfs /dev/shm'], capture_output=True)
    return probe.returncode == 0


pytestmark = [pytest.mark.integration, pytest.mark.skipif(not _namespaces_available(),
                                reason='needs root and unshare --ipc --mount (a private /dev/shm per node)')]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run_two_nodes(tmp_path: Path, overrides: list[str], timeout: float = 600) -> tuple[list[Path], list[str]]:
    """Start node 0 and node 1 at once with the same command but ``--node_rank``; wait for both."""
    composer = Path(sys.executable).parent / 'composer'
    view = tmp_path / 'node'  # the node-local path; each node sees its own disk there
    view.mkdir(exist_ok=True)
    port = _free_port()
    disks, procs = [], []
    for node in (0, 1):
        disk = tmp_path / f'node{node}-disk'
        disk.mkdir()
        disks.append(disk)
        cmd = ['unshare', '--ipc', '--mount', '--propagation', 'private', '--', 'sh', '-c', NODE_SETUP, 'node',
               str(composer), '--world_size', '2', '--nproc', '1', '--node_rank', str(node),
               '--master_addr', '127.0.0.1', '--master_port', str(port),
               'run.py', 'yamls/tiny-cpu.yaml', *overrides]
        env = dict(os.environ, OMP_NUM_THREADS='1', NODE_DISK=str(disk), NODE_VIEW=str(view))
        env.pop('TMPDIR', None)
        with open(disk / 'launcher.out', 'w') as out:  # the launcher's own output and its local rank 0's
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:  # on a timeout or a failure, stop what this test started (its own process groups)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    outs = [(disk / 'launcher.out').read_text() for disk in disks]
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0], f'exit codes {codes}\n' + '\n'.join(
        f'=== node {node}\n{out[-5000:]}' for node, out in enumerate(outs))
    return disks, outs


def test_two_nodes_train_together(demo_photos, tmp_path):
    from diffusion.callbacks.sample_ledger import weights_digest
    from diffusion.checkpoints import load_checkpoint_state
    view, shared = tmp_path / 'node', tmp_path / 'shared'
    over = tiny_overrides(
        demo_photos, shared, max_duration='2ba', eval_interval='2ba', save_interval='2ba',
        **{'variables.data': str(view / 'cache'),  # node-local cache of the remote
           'train_loader.remote': str(demo_photos), 'eval_loader.remote': str(demo_photos),
           'train_loader.caption_dropout': '0.0',  # the caption identifies the photo
           'callbacks.sample_ledger.folder': str(view / 'ledger'),
           'callbacks.sample_images.folder': str(view / 'samples'),
           'autoresume': 'true', 'save_overwrite': 'false', 'eval_first': 'false'})
    start = time.monotonic()
    disks, outs = _run_two_nodes(tmp_path, over)
    seconds = time.monotonic() - start

    # One job of world size 2, one rank per node: rank 0 wrote on node 0's disk only, rank 1 on node 1's only.
    assert 'run test-tiny: 2 batches' in outs[0], outs[0][-3000:]
    assert 'processes: 2 on 2 nodes' in outs[0]  # composer's world size / local world size
    assert sorted(p.name for p in (disks[0] / 'ledger').iterdir()) == ['rank0.jsonl']
    assert sorted(p.name for p in (disks[1] / 'ledger').iterdir()) == ['rank1.jsonl']
    assert not (view / 'ledger').exists(), 'a node wrote to the host path instead of its own disk'

    # Each node read through streaming's remote -> local path: its own cache holds the index and shard files
    # copied from the remote (the host's view of the cache path stays empty).
    remote_files = {p.relative_to(demo_photos) for p in demo_photos.rglob('*') if p.is_file()}
    for disk in disks:
        cached = {p.relative_to(disk / 'cache') for p in (disk / 'cache').rglob('*') if p.is_file()}
        assert Path('train/index.json') in cached and Path('eval/index.json') in cached, cached
        shards = {p for p in cached if p.name != 'index.json'}
        assert shards and shards <= remote_files, (shards, remote_files)
    assert not (view / 'cache').exists()

    # The nodes trained on disjoint shares of the epoch, and DDP kept their weights identical.
    batches0, digest0 = _ledger(disks[0] / 'ledger' / 'rank0.jsonl')
    batches1, digest1 = _ledger(disks[1] / 'ledger' / 'rank1.jsonl')
    assert [len(b) for b in batches0] == [4, 4] and [len(b) for b in batches1] == [4, 4]
    seen0 = [c for b in batches0 for c in b]
    seen1 = [c for b in batches1 for c in b]
    assert len(set(seen0)) == 8 and len(set(seen1)) == 8, (seen0, seen1)
    assert not set(seen0) & set(seen1), 'the nodes trained on the same photos'
    assert digest0 == digest1, 'the two nodes ended with different weights'
    # The checkpoint rank 0 wrote to the shared folder holds the same weights, and they moved from the start.
    state = load_checkpoint_state(shared / 'ckpt' / 'latest-rank0.pt')
    model_state = {k.removeprefix('module.'): v for k, v in state['state']['model'].items()}
    assert weights_digest(model_state) == digest0
    print(f'two-node run: {seconds:.0f} s')
