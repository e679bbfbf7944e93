"""Launch at scale: the Slurm sbatch script, run on this machine with a stand-in `srun` that executes the command
it is given (one task: node 0 of a one-node allocation), trains the tiny config through the composer launcher."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration  # processes of its own or a whole pipeline: pytest -m "not integration" skips it

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / 'scripts' / 'launch' / 'slurm.sbatch'

# Stand-in srun: drops srun's own options, records the command, runs it as one task with SLURM_NODEID=0.
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
printf '%s\\0' "$@" > "$SRUN_LOG"
SLURM_NODEID=0 exec "$@"
"""


def test_sbatch_script_runs_the_same_command_through_a_stand_in_srun(demo_photos, tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text(FAKE_SRUN)
    (bin_dir / 'scontrol').write_text('#!/bin/bash\necho 127.0.0.1\n')  # `scontrol show hostnames`
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    out = tmp_path / 'run'
    env = dict(os.environ, PATH=f'{bin_dir}:{Path(sys.executable).parent}:{os.environ["PATH"]}',
               SRUN_LOG=str(tmp_path / 'srun.log'), SLURM_JOB_NUM_NODES='1', SLURM_JOB_NODELIST='node-a',
               SLURM_JOB_ID='4242', SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE='1', OMP_NUM_THREADS='1')
    args = ['yamls/tiny-cpu.yaml', f'variables.data={demo_photos}', f'save_folder={out}/ckpt', 'max_duration=2ba',
            'eval_interval=2ba', 'save_interval=2ba', 'eval_first=false', 'callbacks.sample_images.num_inference_steps=2',
            f'callbacks.sample_images.folder={out}/samples']
    proc = subprocess.run(['bash', str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'launch: 1 node(s) x 1 process(es), master 127.0.0.1:24242' in proc.stdout
    srun_cmd = (tmp_path / 'srun.log').read_text().split('\0')
    assert srun_cmd[:2] == ['bash', '-c'] and srun_cmd[3:5] == ['launch', 'yamls/tiny-cpu.yaml']
    assert '--node_rank "$SLURM_NODEID"' in srun_cmd[2]  # read per task, inside srun
    assert 'run tiny-cpu: 2 batches' in proc.stdout, proc.stdout[-3000:]
    assert (out / 'ckpt' / 'latest-rank0.pt').exists()


def test_sbatch_script_without_a_config_is_a_usage_error(tmp_path):
    proc = subprocess.run(['bash', str(SBATCH)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and 'usage' in proc.stderr


def test_mosaicml_run_yaml_launches_a_recipe_that_exists():
    run = yaml.safe_load((REPO / 'scripts' / 'launch' / 'mosaicml.yaml').read_text())
    assert {'name', 'image', 'compute', 'integrations', 'command'} <= set(run)
    recipe = run['command'].split('run.py')[1].split()[0]
    assert (REPO / recipe).is_file(), recipe
    assert 'secret' not in run['command'].lower() and 'AWS_SECRET' not in run['command']
