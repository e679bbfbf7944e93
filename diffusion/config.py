"""The training config: YAML + dotted overrides, checked against a typed schema before anything is built.

``composer run.py yamls/X.yaml model.backbone.preset=mini-s max_duration=10ba``

* ``variables:`` holds shared values; use them as ``${variables.name}`` anywhere (resolved, then dropped).
* Top-level keys are the fields of :class:`TrainConfig`: an unknown key, a missing required key or a value of
  the wrong type is a :class:`ConfigError` that names the key and lists the allowed keys.
* Component blocks (``model``, ``train_loader``, ``optimizer``, ...) are ``name: <registered name>`` plus the
  constructor's keyword arguments; they are checked against the registry and the constructor's signature when
  built (see :func:`diffusion.registry.build`). ``algorithms``, ``callbacks`` and ``loggers`` are mappings as in
  llm-foundry: the key is the registered name (or any label, with ``name:`` inside the block).
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ['ConfigError', 'TrainConfig', 'check_data_paths', 'check_variables', 'cli_config', 'run_cli', 'load_config', 'load_yaml', 'save_config',
           'describe_type', 'time_string_error', 'to_container', 'validate']


class ConfigError(ValueError):
    """The config does not match the schema; the message names the key and what is allowed."""


@dataclass
class TrainConfig:
    """Everything ``run.py`` accepts at the top level of a YAML (see ``yamls/tiny-cpu.yaml``)."""
    # What to train, on what, with what (required).
    model: dict[str, Any]
    train_loader: dict[str, Any]
    optimizer: dict[str, Any]
    max_duration: str
    global_train_batch_size: int
    # Optional components.
    eval_loader: Optional[dict[str, Any]] = None
    scheduler: Optional[dict[str, Any]] = None
    algorithms: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    loggers: dict[str, Any] = field(default_factory=dict)
    # Run identity and reproducibility.
    run_name: Optional[str] = None
    seed: int = 17
    deterministic_mode: bool = False  # composer's deterministic algorithms: a killed+resumed run is bit-exact
    # Batching, evaluation.
    device_train_microbatch_size: Optional[Any] = None  # int, or 'auto' on GPU; None = whole device batch
    device_eval_batch_size: Optional[int] = None
    eval_interval: str = '1ep'
    eval_first: bool = False  # evaluate once before training (the starting validation loss)
    eval_subset_num_batches: int = -1
    # Hardware and numerics.
    device: Optional[str] = None  # 'cpu' | 'gpu' | None (auto)
    precision: str = 'fp32'  # 'fp32' | 'amp_bf16' | 'amp_fp16' (GPU only)
    fsdp_config: Optional[dict[str, Any]] = None  # composer FSDP; needs CUDA
    dist_timeout: float = 600.0
    # Checkpoints.
    save_folder: Optional[str] = None
    save_interval: str = '1ep'
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    save_weights_only: bool = False
    load_path: Optional[str] = None
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    # globs of checkpoint paths not to load (composer's load_ignore_keys), e.g. 'state/schedulers/*/base_lrs' to
    # resume a run's weights, optimizer moments and clock under a new learning rate
    load_ignore_keys: list = field(default_factory=list)
    autoresume: bool = False
    # Logging.
    console_log_interval: str = '10ba'
    log_to_console: bool = True
    progress_bar: bool = False
    python_log_level: Optional[str] = 'info'
    # Dry run: validate and build on the meta device, print parameters, FLOPs and the cost (no data, no weights).
    dry_run: bool = False
    # Dry run's cost figures: {gpu, images_per_second_per_gpu, num_gpus, usd_per_gpu_hour}.
    throughput: Optional[dict[str, Any]] = None
    # Shared values for interpolation (removed after resolution).
    variables: dict[str, Any] = field(default_factory=dict)


def save_config(cfg: Any, path: Union[str, Path]) -> None:
    """Write a validated config dataclass as YAML (resolved), e.g. next to the checkpoints it produced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(dataclasses.asdict(cfg)), path)


def describe_type(tp: Any) -> str:
    """A type as an error message names it: ``int``, ``list[str]``, ``Optional[int]``, ``None``."""
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace('typing.', '').replace('NoneType', 'None')


def _check_type(key: str, value: Any, tp: Any) -> None:
    """Strict, readable type check for the scalar and mapping fields of :class:`TrainConfig`."""
    origin = getattr(tp, '__origin__', None)
    if origin is Union:
        args = [a for a in tp.__args__ if a is not type(None)]
        if value is None:
            return
        tp, origin = (args[0], getattr(args[0], '__origin__', None)) if len(args) == 1 else (Any, None)
    if tp is Any:
        return
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f'config key `{key}` must be a mapping (a YAML block), got {type(value).__name__}: '
                              f'{value!r}')
        return
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f'config key `{key}` must be of type {describe_type(tp)}, got {type(value).__name__}: '
                          f'{value!r}')


# Composer's time units (composer.core.time.TimeUnit); parsed here so a typo fails before the slow imports.
_TIME_UNITS = ('ep', 'ba', 'sp', 'tok', 'dur', 'iter', 'sec')
_TIME_RE = re.compile(r'^(.+?)(' + '|'.join(_TIME_UNITS) + r')$', flags=re.IGNORECASE)
TIME_KEYS = ('max_duration', 'eval_interval', 'save_interval', 'console_log_interval')


def time_string_error(value: str) -> Optional[str]:
    """Why ``value`` is not a composer time string (as ``Time.from_timestring`` parses it), or None if it is."""
    match = _TIME_RE.match(value.strip())
    accepted = (f'a number followed by one of {list(_TIME_UNITS)} (e.g. 550000ba, 10ep, 0.5dur; only dur may '
                f'be fractional)')
    if not match:
        return f'invalid time string {value!r}: expected {accepted}'
    try:
        number = float(match.group(1))
    except ValueError:
        return f'invalid time string {value!r}: {match.group(1)!r} is not a number; expected {accepted}'
    if match.group(2).lower() != 'dur' and int(number) != number:
        return f'invalid time string {value!r}: {match.group(2)} needs a whole number; expected {accepted}'
    return None


def _loader_folders(block: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """(config path, folder) of every local-only dataset a loader block reads (no ``remote``: must exist)."""
    streams = block.get('streams')
    entries = [(where, block)]
    if isinstance(streams, dict):
        entries = [(f'{where}.streams.{k}', v) for k, v in streams.items()]
    elif isinstance(streams, list):
        entries = [(f'{where}.streams[{i}]', v) for i, v in enumerate(streams)]
    out = []
    for path, entry in entries:
        if not isinstance(entry, dict) or entry.get('remote') or not entry.get('local'):
            continue
        split = entry.get('split', block.get('split'))
        out.append((f'{path}.local', os.path.join(str(entry['local']), str(split)) if split else str(entry['local'])))
    return out


def check_data_paths(cfg: Any) -> None:
    """A local dataset folder (no ``remote:``) that does not exist is a config error naming its key.

    Raises:
        ConfigError: Naming the loader key and the missing folder.
    """
    for name in ('train_loader', 'eval_loader'):
        block = getattr(cfg, name, None)
        if not isinstance(block, dict):
            continue
        for key, folder in _loader_folders(block, name):
            if not os.path.isdir(folder):
                raise ConfigError(f'`{key}`: dataset folder {folder!r} does not exist (give an existing MDS '
                                  f'folder, or a `remote:` to download from with `local:` as its cache)')


def _merge(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'override {item!r} is not of the form key.path=value')
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f'bad override: {err}') from err


_VARIABLE_USE = re.compile(r'\$\{variables(?:\.([A-Za-z0-9_-]+))?')


def check_variables(cfg: DictConfig, defined: set[str]) -> None:
    """A name under ``variables:`` that no ``${variables.NAME}`` uses and the YAML does not define (a typo such as
    ``variables.dat=my_photos``) is an error naming the known variables.

    Args:
        cfg: The merged, unresolved config.
        defined: The variable names the YAML (with its ``base:``) defines before the overrides.

    Raises:
        ConfigError: Naming the unknown variable(s) and the known ones.
    """
    import difflib
    given = cfg.get('variables')
    if not isinstance(given, DictConfig):
        return
    used: set[str] = set()
    for match in _VARIABLE_USE.finditer(OmegaConf.to_yaml(cfg)):  # the unresolved text holds every ${...}
        if match.group(1) is None:
            return  # `${variables}` as a whole: every name is used
        used.add(match.group(1))
    unknown = sorted(set(given) - used - defined)
    if unknown:
        known = sorted(used | defined)
        close = {n: difflib.get_close_matches(n, known, n=1) for n in unknown}
        hints = ''.join(f' (did you mean `variables.{c[0]}`?)' for c in close.values() if c)
        raise ConfigError(f'unknown variable(s) {unknown}: no `${{variables.NAME}}` in the config uses '
                          f'{"it" if len(unknown) == 1 else "them"}{hints}. Known variables: {known}.')


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolve interpolations (``${variables.x}``) into a plain dict."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f'could not resolve an interpolation: {err}') from err


def validate(raw: dict[str, Any], schema: type = None) -> Any:
    """Check a plain dict against a config dataclass (default :class:`TrainConfig`) and build it.

    Raises:
        ConfigError: Naming the unknown, missing or ill-typed key and the allowed keys.
    """
    schema = schema or TrainConfig
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        blocks = [n for n, f in fields.items() if n != 'variables' and typing.get_type_hints(schema)[n] in (dict[str, Any],
                                                                                     Optional[dict[str, Any]])]
        hint = (f' If it is an argument of a component, put it inside that component\'s block '
                f'({", ".join(blocks)}).') if blocks else ''
        raise ConfigError(f'unknown top-level config key(s) {unknown}. Allowed keys: {sorted(fields)}.{hint}')
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # type: ignore
    missing = [n for n in required if raw.get(n) is None]
    if missing:
        raise ConfigError(f'missing required config key(s) {missing}. Required keys: {required}.')
    hints = typing.get_type_hints(schema)
    for name, value in raw.items():
        _check_type(name, value, hints[name])
        if name in TIME_KEYS and isinstance(value, str) and time_string_error(value):
            raise ConfigError(f'config key `{name}`: {time_string_error(value)}')
    for name in ('model', 'train_loader', 'optimizer', 'eval_loader', 'scheduler'):
        block = raw.get(name) if name in fields else None
        if isinstance(block, dict) and 'name' not in block:
            raise ConfigError(f'config block `{name}` needs a `name:` key naming a registered component.')
    for name in ('algorithms', 'callbacks', 'loggers'):
        if name not in fields:
            continue
        for label, block in (raw.get(name) or {}).items():
            if block is not None and not isinstance(block, dict):
                raise ConfigError(f'`{name}.{label}` must be a mapping of keyword arguments (or empty), got '
                                  f'{type(block).__name__}: {block!r}')
    return schema(**raw)


def load_yaml(path: Union[str, Path], _seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read a config YAML; a top-level ``base: other.yaml`` (relative to this file) is read first and this file's
    keys are merged over it, so a recipe variant (e.g. the 512 px continuation) states only what differs.

    Raises:
        ConfigError: Unreadable file, not a mapping, missing or circular ``base``.
    """
    path = Path(path)
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException) as err:
        raise ConfigError(f'could not read config {path}: {err}') from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f'config {path} must be a YAML mapping at the top level')
    if 'base' not in cfg:
        return cfg
    parent = path.parent / str(cfg.pop('base'))
    if parent.resolve() in _seen or not parent.is_file():
        raise ConfigError(f'config key `base` in {path}: {parent} is ' +
                          ('circular' if parent.is_file() else 'not a file') + ' (a YAML path relative to this file)')
    return OmegaConf.merge(load_yaml(parent, _seen + (path.resolve(),)), cfg)  # type: ignore[return-value]


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = (),
                base: Optional[dict[str, Any]] = None, schema: Optional[type] = None) -> Any:
    """Load a YAML file (or ``base`` dict), apply ``key.path=value`` overrides, resolve, validate.

    Args:
        path: The YAML file.
        overrides: Dotted overrides, e.g. ``['max_duration=5ba', 'model.backbone.preset=mini-s']``.
        base: A dict to use instead of a file (tests).
        schema: The config dataclass (default :class:`TrainConfig`; generation and evaluation have their own).

    Returns:
        The validated config dataclass.
    """
    if (path is None) == (base is None):
        raise ValueError('give exactly one of path or base')
    cfg = load_yaml(path) if path is not None else OmegaConf.create(base)
    defined = set(cfg.get('variables') or {}) if isinstance(cfg.get('variables'), DictConfig) else set()
    cfg = _merge(cfg, overrides)
    check_variables(cfg, defined)
    raw = to_container(cfg)
    raw.pop('variables', None)
    return validate(raw, schema)


def cli_config(argv: Optional[Sequence[str]], usage: str, schema: Optional[type] = None) -> tuple[Any, int]:
    """The shared front of the ``run*.py`` commands: ``PROG CONFIG.yaml [key.path=value ...]`` (or, where the
    schema needs no YAML, ``PROG key=value ...``).

    Args:
        argv: Arguments after the program name (default ``sys.argv[1:]``).
        usage: The usage line printed for ``-h`` / ``--help`` or a missing config.
        schema: The config dataclass (default :class:`TrainConfig`).

    Returns:
        ``(config, 0)``, or ``(None, status)`` after printing why: 0 for help, 2 for a usage or config error.
    """
    import logging
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(f'usage: {usage}')
        return None, 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        if '=' in argv[0] and not argv[0].endswith(('.yaml', '.yml')):  # no YAML: every setting on the command line
            return load_config(base={}, overrides=argv, schema=schema), 0
        return load_config(argv[0], argv[1:], schema=schema), 0
    except ConfigError as err:
        print(f'config error: {err}', file=sys.stderr)
        return None, 2


def run_cli(argv: Optional[Sequence[str]], usage: str, schema: type, action: Any) -> tuple[Any, int]:
    """:func:`cli_config`, then ``action(config)``; bad input (a config error, a bad value, a missing file) is
    printed as one ``error:`` line.

    Returns:
        ``(result, 0)``, or ``(None, status)``: 0 for help, 2 for a usage, config or input error.
    """
    import sys
    cfg, status = cli_config(argv, usage, schema)
    if cfg is None:
        return None, status
    try:
        return action(cfg), 0
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return None, 2
