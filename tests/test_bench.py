"""The bench scripts run end to end at their smallest settings and keep their contract: a table, then one JSON line
of figures. Nothing here checks a speed (those are measured by running the scripts on an idle machine); the checks
are on what does not depend on the machine: FLOP counts, batch sizes, which keys are reported."""
import json
import runpy
import sys

import pytest
import torch


def run_bench(repo, capsys, monkeypatch, name: str, *argv: str) -> dict:
    monkeypatch.setattr(sys, 'argv', [f'bench/{name}.py', *argv])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(repo / 'bench' / f'{name}.py'), run_name='__main__')
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_masking_counts_fewer_flops_the_more_it_masks(repo, capsys, monkeypatch):
    figures = run_bench(repo, capsys, monkeypatch, 'masking', '--only', 'mini', '--repeats', '1', '--steps', '2',
                        '--warmup', '0')
    for model in ('mixer', 'naive'):
        gflops = [figures[f'mini_{model}_{r:03d}']['gflop_img'] for r in (0, 50, 75)]
        assert gflops[0] > gflops[1] > gflops[2] > 0, (model, gflops)
        assert figures[f'mini_{model}_075']['flop_ratio'] == pytest.approx(gflops[0] / gflops[2], rel=1e-3)
        assert all(figures[f'mini_{model}_{r:03d}']['ms_step'] > 0 for r in (0, 50, 75))
    # the patch-mixer sees every token: it costs FLOPs that naive masking does not spend
    assert figures['mini_mixer_075']['gflop_img'] > figures['mini_naive_075']['gflop_img']
    # TREAD: routing more tokens saves more, but every token still runs the first and last blocks and the mixer,
    # so it saves less than masking the same share
    routed = [figures['mini_mixer_000']['gflop_img']] + [figures[f'mini_tread_{r:03d}']['gflop_img'] for r in (50, 75)]
    assert routed[0] > routed[1] > routed[2] > figures['mini_mixer_075']['gflop_img'], routed
    assert figures['tread_flop_ratio_075_mini'] == pytest.approx(routed[0] / routed[2], rel=1e-3)


def test_masking_rejects_a_single_step(repo, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        run_bench(repo, capsys, monkeypatch, 'masking', '--steps', '1')
    assert '--steps must be >= 2' in capsys.readouterr().err


def test_latents_and_step_report_their_ratios(repo, capsys, monkeypatch):
    latents = run_bench(repo, capsys, monkeypatch, 'latents', '--steps', '2', '--warmup', '1', '--threads', '2')
    assert latents['batch_size'] == 8 and latents['resolution'] == 64
    assert latents['ratio_online_over_precomputed'] == pytest.approx(
        latents['online_s_per_step'] / latents['precomputed_s_per_step'], rel=0.01)
    step = run_bench(repo, capsys, monkeypatch, 'step', '--steps', '2', '--repeats', '1', '--warmup', '1')
    for variant in ('pixels', 'latents'):
        assert step[f'{variant}_ratio'] == pytest.approx(
            step[f'{variant}_composer_imgs_per_s'] / step[f'{variant}_plain_imgs_per_s'], rel=0.01)
