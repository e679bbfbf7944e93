"""The equal-compute study's arms (scripts/equal_compute.py): each is its demo recipe with one stated change, a
config run.py accepts, and the budget becomes steps at the calibrated step times."""
import importlib.util
import sys
from pathlib import Path

import pytest

from diffusion.config import load_config
from diffusion.models.microdit import build_microdit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def study():
    spec = importlib.util.spec_from_file_location('equal_compute', REPO / 'scripts' / 'equal_compute.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(study, arm, steps=None, extra=()):
    args = study.parse_args(['--out', 'unused', *extra])
    base = study.arm_config(arm, args, steps)
    return load_config(base=base, overrides=study.run_overrides(Path('d'), Path('v'), Path('o'), arm, 1, 40))


def test_every_arm_differs_from_its_demo_recipe_in_what_its_name_says(study):
    schedules = {}
    for arm in study.ARMS:
        cfg = _config(study, arm, {'masked': 30, 'unmasked': 10})
        sched = cfg.model['noise_schedule']
        schedules[arm] = (sched['name'], sched.get('prediction_type'))
        assert cfg.max_duration == '40ba' and cfg.seed == 18 and cfg.run_name == f'ec-{arm}-s1'
        if arm.startswith('microdit'):
            backbone, algorithms = cfg.model['backbone'], cfg.algorithms
            assert ('tread' in arm) == (backbone.get('tread') is not None)
            if arm.endswith('masked'):
                assert backbone['mask_ratio'] == 0.75
                assert algorithms['mask_schedule']['schedule'] == [['0ba', 0.75], ['30ba', 0.0]]
            else:
                assert backbone['mask_ratio'] == 0.0 and 'mask_schedule' not in algorithms
    assert schedules['unet-v'] == ('ddpm', 'v_prediction') and schedules['unet-eps'] == ('ddpm', 'epsilon')
    assert schedules['microdit-edm'][0] == 'edm'
    assert {schedules[a][0] for a in ('unet-flow', 'microdit-flow', 'microdit-flow-tread')} == {'flow_matching'}
    eps = _config(study, 'unet-eps').model['noise_schedule']
    assert eps['zero_terminal_snr'] is False and eps['loss_weighting'] == 'uniform'


def test_the_tread_arm_builds_a_routing_microdit_and_the_budget_becomes_steps(study):
    cfg = _config(study, 'microdit-flow-tread', extra=['--tread-ratio', '0.25', '--tread-range', '2', '4'])
    backbone = cfg.model['backbone']
    model = build_microdit(backbone['preset'], sample_size=backbone['sample_size'], tread=backbone['tread'])
    assert (model.tread.ratio, model.tread.start, model.tread.end) == (0.25, 2, 4)
    times = {'unet-v': 0.2, 'microdit-edm-masked': 0.05, 'microdit-edm-masked:finetune': 0.1}
    assert study.budget_steps('unet-v', 100, 0.2, times) == {'masked': 0, 'unmasked': 500}
    assert study.budget_steps('microdit-edm-masked', 100, 0.2, times) == {'masked': 1600, 'unmasked': 200}


def test_a_later_budget_reuses_an_earlier_studys_step_times(study, tmp_path):
    """``--calibration``: a later budget is counted at the step times the first budget's runs were planned with."""
    import json
    data, vae = tmp_path / 'latents', tmp_path / 'vae'
    data.mkdir()
    vae.mkdir()
    (data / 'latents.json').write_text(json.dumps({'vae': str(vae)}))
    earlier = REPO / 'docs' / 'results' / 'equal-compute-360.json'
    argv = ['--budgets', '360', '1200', '--data', str(data), '--out', str(tmp_path / 'out'), '--calibration',
            str(earlier), '--import-runs', str(earlier), '--report']
    assert study.main(argv) == 0
    record = json.loads(earlier.read_text())
    times = json.loads((tmp_path / 'out' / 'calibration.json').read_text())
    assert times == record['step_cpu_s']
    assert study.budget_steps('microdit-flow', 1200, 0.2, times) == {
        'masked': 0, 'unmasked': int(1200 / times['microdit-flow'])}
    # The earlier runs count as done: the same table, the same ranking, nothing of the 1,200 budget yet.
    result = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert len(result['runs']) == len(record['runs']) and result['summary']['1200']['ranking'] == []
    assert result['summary']['360'] == record['summary']['360']
    args = study.parse_args(['--out', str(tmp_path / 'out')])
    assert study.import_runs(args, earlier) == 0  # already there: nothing is overwritten


def test_calibration_runs_in_a_child_process_whose_failure_reaches_the_caller(study, tmp_path, monkeypatch):
    """The calibration's models live in a spawned child (its memory goes back when it ends); an error there is
    raised here, not a pool left waiting."""
    # The child imports the study by name, as it does the script's __main__ when run: here under its own name.
    monkeypatch.syspath_prepend(str(REPO / 'scripts'))
    monkeypatch.setitem(sys.modules, 'equal_compute', study)
    args = study.parse_args(['--out', str(tmp_path / 'out')])
    with pytest.raises(KeyError, match='no-such-arm') as error:  # the configs come first: no model is built
        study.calibrate_apart(args, tmp_path / 'latents', tmp_path / 'vae', ['microdit-flow', 'no-such-arm'])
    assert 'in calibrate' in str(error.value.__cause__)  # the child's traceback, as the process pool passes it on
