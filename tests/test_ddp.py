"""``composer -n 2 run.py yamls/tiny-cpu.yaml`` over gloo: streaming gives the two ranks disjoint samples, and both
ranks end with the weights the checkpoint holds. One 2-process run (the extra run costs ~40 s of imports)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import tiny_overrides

pytestmark = pytest.mark.integration  # processes of its own or a whole pipeline: pytest -m "not integration" skips it

REPO = Path(__file__).resolve().parents[1]


def _ledger(path: Path) -> tuple[list[list[str]], str]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    batches = [r['samples'] for r in records if 'samples' in r]
    digests = [r['weights_sha1'] for r in records if 'weights_sha1' in r]
    assert len(digests) == 1, records
    return batches, digests[0]


def test_two_ranks_disjoint_samples_same_weights(demo_photos, tmp_path):
    from diffusion.callbacks.sample_ledger import weights_digest
    from diffusion.checkpoints import load_checkpoint_state
    composer = Path(sys.executable).parent / 'composer'
    over = tiny_overrides(demo_photos, tmp_path, max_duration='2ba', eval_interval='2ba', save_interval='2ba') + [
        'train_loader.caption_dropout=0.0',  # the caption identifies the photo
        f'callbacks.sample_ledger.folder={tmp_path / "ledger"}', 'eval_first=false']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([str(composer), '-n', '2', '--stdout', str(tmp_path / 'rank{rank}.out'),
                           '--stderr', str(tmp_path / 'rank{rank}.err'), 'run.py', 'yamls/tiny-cpu.yaml', *over],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    logs = proc.stdout + ''.join(p.read_text() for p in sorted(tmp_path.glob('rank*.*')))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-5000:]
    assert 'run test-tiny: 2 batches' in logs
    batches0, digest0 = _ledger(tmp_path / 'ledger' / 'rank0.jsonl')
    batches1, digest1 = _ledger(tmp_path / 'ledger' / 'rank1.jsonl')
    # Global batch 8 over two ranks: 2 batches of 4 samples each per rank.
    assert [len(b) for b in batches0] == [4, 4] and [len(b) for b in batches1] == [4, 4]
    seen0 = [c for b in batches0 for c in b]
    seen1 = [c for b in batches1 for c in b]
    assert len(set(seen0)) == 8 and len(set(seen1)) == 8, (seen0, seen1)  # no repeats within an epoch
    assert not set(seen0) & set(seen1), 'the ranks trained on the same photos'
    # DDP keeps the replicas identical; the checkpoint (written by rank 0) holds the same weights.
    assert digest0 == digest1
    state = load_checkpoint_state(tmp_path / 'ckpt' / 'latest-rank0.pt')
    model_state = {k.removeprefix('module.'): v for k, v in state['state']['model'].items()}
    assert weights_digest(model_state) == digest0
