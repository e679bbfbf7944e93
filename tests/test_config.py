"""Config loading and validation, and registry lookups of composer / llm-foundry components."""
import pytest

from diffusion import registry
from diffusion.config import ConfigError, load_config

BASE = {
    'variables': {'lr': 0.5},
    'model': {'name': 'latent_diffusion', 'backbone': {'name': 'unet'}},
    'train_loader': {'name': 'image_caption', 'local': 'x'},
    'optimizer': {'name': 'decoupled_adamw', 'lr': '${variables.lr}'},
    'max_duration': '2ba',
    'global_train_batch_size': 4,
}


def test_valid_config_with_variables_and_overrides():
    cfg = load_config(base=BASE, overrides=['seed=3', 'optimizer.lr=0.25', 'model.backbone.preset=mini-l'])
    assert cfg.seed == 3
    assert cfg.optimizer == {'name': 'decoupled_adamw', 'lr': 0.25}
    assert cfg.model['backbone']['preset'] == 'mini-l'
    assert load_config(base=BASE).optimizer['lr'] == 0.5  # interpolated from variables


def test_unknown_top_level_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(base={**BASE, 'learning_rate': 1.0})
    msg = str(err.value)
    assert "'learning_rate'" in msg and 'global_train_batch_size' in msg and 'optimizer' in msg


def test_missing_required_key():
    base = dict(BASE)
    del base['max_duration']
    with pytest.raises(ConfigError, match='max_duration'):
        load_config(base=base)


@pytest.mark.parametrize('key,value', [('seed', 'abc'), ('global_train_batch_size', 2.5),
                                       ('model', 'latent_diffusion'), ('save_overwrite', 'yes')])
def test_wrong_type_names_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(base={**BASE, key: value})


def test_component_block_needs_name():
    with pytest.raises(ConfigError, match='optimizer'):
        load_config(base={**BASE, 'optimizer': {'lr': 1.0}})


def test_bad_override_and_bad_file(tmp_path):
    with pytest.raises(ConfigError):
        load_config(base=BASE, overrides=['seed'])
    with pytest.raises(ConfigError):
        load_config(tmp_path / 'missing.yaml')


def test_unknown_registry_name_lists_registered_names():
    with pytest.raises(registry.UnknownComponentError) as err:
        registry.build(registry.optimizers, {'name': 'adamw_typo', 'lr': 1.0}, 'optimizer')
    assert 'decoupled_adamw' in str(err.value) and 'optimizer' in str(err.value)


def test_unknown_component_argument_names_it():
    import torch
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(registry.UnknownComponentError) as err:
        registry.build(registry.optimizers, {'name': 'decoupled_adamw', 'lrr': 1.0}, 'optimizer', params=params)
    assert 'lrr' in str(err.value) and "'lr'" in str(err.value)


@pytest.mark.parametrize('reg,name', [
    ('optimizers', 'decoupled_adamw'), ('optimizers', 'decoupled_lionw'), ('schedulers', 'cosine_with_warmup'),
    ('schedulers', 'constant_with_warmup'), ('callbacks', 'scheduled_gc'), ('callbacks', 'speed_monitor'),
    ('algorithms', 'ema'), ('algorithms', 'low_precision_groupnorm'), ('algorithms', 'low_precision_layernorm'),
    ('algorithms', 'gradient_clipping'), ('loggers', 'tensorboard')])
def test_composer_and_foundry_components_by_name(reg, name):
    assert name in getattr(registry, reg).get_all()


def test_composer_components_build():
    import torch
    from composer.algorithms import EMA
    from composer.optim import CosineAnnealingWithWarmupScheduler
    from llmfoundry.optim import DecoupledLionW
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(registry.build(registry.optimizers, {'name': 'decoupled_lionw', 'lr': 1e-4}, params=params),
                      DecoupledLionW)
    assert isinstance(registry.build(registry.schedulers, {'name': 'cosine_with_warmup', 't_warmup': '2ba'}),
                      CosineAnnealingWithWarmupScheduler)
    assert isinstance(registry.build(registry.algorithms, {'name': 'ema', 'half_life': '10ba'}), EMA)


# ------------------------------------------------------------------------------------------------
# Every mistake a user makes on the command line: exit status 2, one message naming the key, no traceback.
# ------------------------------------------------------------------------------------------------
MISTAKES = [
    # (override, words the message must hold)
    ('max_duration=abc', ['max_duration', "'abc'", "'ba'"]),
    ('eval_interval=7xx', ['eval_interval', "'7xx'", "'ep'"]),
    ('save_interval=1.5ba', ['save_interval', 'whole number']),
    ('variables.data=/nonexistent', ['train_loader.local', '/nonexistent', 'does not exist']),
    ('model.backbone.prest=mini-s', ['model.backbone', "'prest'", "'preset'"]),
    ('model.backbone.preset=mini-x', ['model.backbone', "'mini-x'", 'mini-s']),
    ('train_loader.shufle=true', ['train_loader', "'shufle'", "'shuffle'"]),
    ('train_loader.crop=diagonal', ['train_loader', 'diagonal', 'center']),
    ('train_loader.resolution=big', ['train_loader.resolution', 'int', "'big'"]),
    ('model.use_txt_mask=true', ['model', "'use_txt_mask'", 'use_text_mask']),
    ('optimizer.lr=fast', ['optimizer.lr', 'float']),
    ('scheduler.t_warmup=5bb', ['scheduler.t_warmup', "'5bb'"]),
    ('callbacks.speed_monitor.window_sise=3', ['callbacks.speed_monitor', "'window_sise'", 'window_size']),
    ('algorithms={ema: {half_lif: 3ba}}', ['algorithms.ema', "'half_lif'", 'half_life']),
    ('global_train_batch_size=abc', ['global_train_batch_size', 'int']),
    ('deterministic_mode=maybe', ['deterministic_mode', 'bool']),
    ('variables.dat=my_photos', ["['dat']", 'variables.data', "Known variables: ['data', 'resolution', 'run_name']"]),
]


@pytest.mark.parametrize('override,words', MISTAKES, ids=[m[0].split('=')[0] for m in MISTAKES])
def test_every_config_mistake_is_exit_2_naming_the_key(override, words, demo_photos, capsys, repo, monkeypatch):
    from diffusion.training.train import main
    monkeypatch.chdir(repo)
    status = main(['yamls/tiny-cpu.yaml', f'variables.data={demo_photos}', 'save_folder=null', override])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.startswith('config error:')]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert 'Traceback' not in err


def test_time_strings_match_composer():
    from composer.core import Time

    from diffusion.config import time_string_error
    for good in ('10ba', '2ep', '0.5dur', '3e4tok', '100sp', '7iter', '60sec', '1.0ba'):
        assert time_string_error(good) is None, good
        Time.from_timestring(good)
    for bad in ('abc', '7xx', '1.5ba', 'ba', 'xba', '10'):
        assert time_string_error(bad) is not None, bad
        with pytest.raises((ValueError, TypeError)):
            Time.from_timestring(bad)


def test_streams_with_a_missing_folder_are_named(demo_photos, tmp_path):
    from diffusion.config import check_data_paths
    streams = [{'local': str(demo_photos), 'split': 'train'}, {'local': str(tmp_path / 'gone'), 'split': 'train'},
               {'remote': 's3://bucket/x', 'local': str(tmp_path / 'cache')}]
    cfg = load_config(base={**BASE, 'train_loader': {'name': 'image_caption', 'streams': streams}})
    with pytest.raises(ConfigError, match=r'train_loader\.streams\[1\]\.local'):
        check_data_paths(cfg)


def test_variable_typo_is_an_error_naming_the_known_variables(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown variable\(s\) \['lrr'\].*Known variables: \['lr'\]"):
        load_config(base=BASE, overrides=['variables.lrr=0.1'])
    assert load_config(base=BASE, overrides=['variables.lr=0.1']).optimizer['lr'] == 0.1
    # A variable the YAML (or its base) defines may go unused; one only an override adds must be used.
    (tmp_path / 'base.yaml').write_text('variables: {spare: 1, lr: 0.5}\n' + '\n'.join(
        f'{k}: {v!r}' for k, v in BASE.items() if k != 'variables').replace("'", '"'))
    (tmp_path / 'child.yaml').write_text('base: base.yaml\nvariables: {extra: 2}\nseed: ${variables.extra}\n')
    assert load_config(tmp_path / 'child.yaml', ['variables.spare=3']).seed == 2
    with pytest.raises(ConfigError, match='spar'):
        load_config(tmp_path / 'child.yaml', ['variables.spar=3'])
