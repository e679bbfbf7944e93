"""Generation: prompt files, per-image seeds, PNG + manifest + contact sheet, resume, config errors."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion.config import ConfigError, load_config
from diffusion.evaluation.generate import GenerateConfig, generate_images, main, read_prompts, run
from test_export import trained_run

REPO = Path(__file__).resolve().parents[1]


def test_read_prompts_formats(tmp_path):
    (tmp_path / 'p.txt').write_text('a cat\n\n  a dog  \n')
    assert read_prompts(tmp_path / 'p.txt') == ['a cat', 'a dog']
    # PartiPrompts' TSV layout.
    (tmp_path / 'parti.tsv').write_text('Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n'
                                        'element\tAbstract\tBasic\t\n')
    assert read_prompts(tmp_path / 'parti.tsv') == ['bond', 'element']
    (tmp_path / 'c.csv').write_text('id,text\n1,"a red, round apple"\n2,sky\n')
    assert read_prompts(tmp_path / 'c.csv', limit=1) == ['a red, round apple']
    coco = {'images': [], 'annotations': [{'image_id': 2, 'id': 5, 'caption': 'B'},
                                          {'image_id': 1, 'id': 9, 'caption': 'A '}]}
    (tmp_path / 'captions_val2014.json').write_text(json.dumps(coco))
    assert read_prompts(tmp_path / 'captions_val2014.json') == ['A', 'B']
    (tmp_path / 'bad.csv').write_text('id,title\n1,x\n')
    with pytest.raises(ValueError, match='prompt column'):
        read_prompts(tmp_path / 'bad.csv')
    (tmp_path / 'x.xml').write_text('<x/>')
    with pytest.raises(ValueError, match='unknown prompt file type'):
        read_prompts(tmp_path / 'x.xml')


def test_generate_yamls_validate():
    for path in sorted((REPO / 'yamls/generate').glob('*.yaml')):
        cfg = load_config(path, ['checkpoint=x'], schema=GenerateConfig)
        assert cfg.prompts and cfg.out_dir is None  # the output goes beside the run given
        settings = [line.split('#')[0] for line in path.read_text().splitlines()]
        assert not any('outputs/' in line for line in settings), path  # no YAML names a run
    with pytest.raises(ConfigError, match='guidance'):
        load_config(REPO / 'yamls/generate/tiny-cpu.yaml', ['checkpoint=x', 'guidance=3'], schema=GenerateConfig)
    with pytest.raises(ConfigError, match='batch_size'):
        load_config(REPO / 'yamls/generate/tiny-cpu.yaml', ['checkpoint=x', 'batch_size=four'],
                    schema=GenerateConfig)


@pytest.fixture(scope='module')
def gen_run(tmp_path_factory, demo_photos):
    run_dir = trained_run(tmp_path_factory, demo_photos)
    out = tmp_path_factory.mktemp('gen')
    prompts = out / 'prompts.txt'
    prompts.write_text('a cat sitting on a sofa\nan astronaut\ncoffee in a cup\na city skyline\n')
    cfg = load_config(REPO / 'yamls/generate/tiny-cpu.yaml',
                      [f'checkpoint={run_dir}', f'prompts={prompts}', f'out_dir={out / "images"}', 'limit=2',
                       'num_inference_steps=2', 'batch_size=2', 'seed=10', 'height=32', 'width=32'],
                      schema=GenerateConfig)
    first = run(cfg)  # "interrupted" after 2 of 4 prompts
    cfg.limit = None
    cfg.batch_size = 3
    second = run(cfg)
    return cfg, first, second


def test_generate_writes_pngs_manifest_and_sheet(gen_run):
    cfg, first, second = gen_run
    out = Path(cfg.out_dir)
    assert first['num_new'] == 2 and second['num_new'] == 2 and second['num_images'] == 4
    entries = [json.loads(x) for x in (out / 'manifest.jsonl').read_text().splitlines()]
    assert sorted(e['index'] for e in entries) == [0, 1, 2, 3]
    e = next(e for e in entries if e['index'] == 2)
    assert e['prompt'] == 'coffee in a cup' and e['seed'] == 12 and e['guidance_scale'] == 3.0
    assert e['checkpoint'].endswith('.pt') and e['weights'] == 'ema'
    with Image.open(out / e['file']) as im:
        assert im.size == (32, 32)
    with Image.open(out / 'contact_sheet.png') as sheet:
        assert sheet.size[0] >= 2 * 32
    # An image depends on its seed only, not on its batch (it was made beside index 3; here alone): the same
    # picture up to one grey level, since a batched convolution may round the last float bit differently.
    from diffusion.checkpoints import load_model
    model, _ = load_model(cfg.checkpoint)
    again = generate_images(model, ['coffee in a cup'], [12], guidance_scale=3.0, num_inference_steps=2,
                            sampler='ddim', height=32, width=32)[0]
    with Image.open(out / e['file']) as im:
        diff = np.abs(np.asarray(im, dtype=np.int16) - np.asarray(again, dtype=np.int16)).max()
    assert diff <= 1


def test_resume_refuses_other_settings(gen_run):
    cfg, _, _ = gen_run
    cfg.guidance_scale = 5.0
    try:
        with pytest.raises(ValueError, match='guidance_scale'):
            run(cfg)
    finally:
        cfg.guidance_scale = 3.0


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main([str(REPO / 'yamls/generate/tiny-cpu.yaml'), 'no_such_key=1']) == 2
    assert 'no_such_key' in capsys.readouterr().err
    assert main([str(REPO / 'yamls/generate/tiny-cpu.yaml'), 'checkpoint=x', f'prompts={tmp_path / "missing.txt"}']) == 2
    assert 'missing.txt' in capsys.readouterr().err


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, demo_photos):
    return trained_run(tmp_path_factory, demo_photos)


def test_cli_mistakes_are_one_line_before_the_model_loads(run_dir, tmp_path, capsys):
    for args, words in [(['checkpoint=/no/such/run', 'prompts=["a cat"]'], ['/no/such/run', 'does not exist']),
                        ([f'checkpoint={tmp_path}', 'prompts=["a cat"]'], ['holds no composer checkpoint']),
                        ([f'checkpoint={run_dir}', 'prompts=a ginger cat on a sofa'],
                         ["'a ginger cat on a sofa'", 'does not exist', 'prompts=\'["'])]:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), (args, err)


def test_run_folder_and_inline_prompts_without_a_yaml(run_dir, tmp_path, capsys):
    # outputs/RUN/checkpoints as the recipes lay a run out; the run folder is what the user gives.
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'checkpoints').symlink_to(run_dir)
    common = [f'checkpoint={tmp_path / "run"}', 'prompts=["a cat","a dog"]', 'num_inference_steps=2', 'height=32',
              'width=32', 'contact_sheet=0']
    assert main(common) == 0
    out = capsys.readouterr().out
    assert 'using ' in out and '(ema weights, batch 2)' in out and out.count('using ') == 1, out
    first = tmp_path / 'run' / 'generate'
    assert [json.loads(x)['prompt'] for x in (first / 'manifest.jsonl').read_text().splitlines()] == ['a cat', 'a dog']
    # Other settings: a new folder beside it, not an error and not mixed in.
    assert main(common + ['seed=5']) == 0
    assert len((tmp_path / 'run' / 'generate-2' / 'manifest.jsonl').read_text().splitlines()) == 2
    assert len((first / 'manifest.jsonl').read_text().splitlines()) == 2
