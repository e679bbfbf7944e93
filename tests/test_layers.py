"""The house: the library's layers follow the pipeline and every import points down it (docs/architecture.md).

A module may import its own layer and the layers below it, never one above, so nothing low (the model, a
callback) depends on something high (evaluation, export). Imports inside functions count too."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Bottom to top. callbacks/ is installed as the package diffusion.callbacks.
LAYERS = [
    ('config', ['diffusion/__init__.py', 'diffusion/config.py', 'diffusion/registry.py']),
    ('maths and data', ['diffusion/schedule_maths.py', 'diffusion/schedules.py', 'diffusion/flow_matching.py',
                        'diffusion/samplers.py', 'diffusion/data/']),
    ('models', ['diffusion/models/']),
    ('algorithms and callbacks', ['diffusion/algorithms/', 'callbacks/']),
    ('building and loading', ['diffusion/builders.py', 'diffusion/checkpoints.py']),
    ('training', ['diffusion/training/']),
    ('evaluation and export', ['diffusion/evaluation/', 'diffusion/export/', 'diffusion/app.py']),
    ('demo', ['diffusion/demo/']),
]


def _layer(path: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(path == p or (p.endswith('/') and path.startswith(p)) for p in prefixes):
            return index
    return None


def _module_layer(module: str) -> int | None:
    if module == 'diffusion':
        return 0
    parts = module.split('.')
    if parts[:2] == ['diffusion', 'callbacks']:
        return _layer('callbacks/')
    base = '/'.join(parts)
    for candidate in (f'{base}.py', f'{base}/', f'{base}/__init__.py'):
        found = _layer(candidate)
        if found is not None:
            return found
    return None


def _is_module(name: str) -> bool:
    base = REPO / name.replace('.', '/')
    return base.with_suffix('.py').exists() or base.is_dir()


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from diffusion import registry` imports the module diffusion.registry; `from x.y import f`, x.y
            out += [f'{node.module}.{a.name}' if _is_module(f'{node.module}.{a.name}') else node.module
                    for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m == 'diffusion' or m.startswith('diffusion.')]


def upward_imports() -> list[str]:
    found = []
    files = sorted(REPO.glob('diffusion/**/*.py')) + sorted(REPO.glob('callbacks/*.py'))
    for path in files:
        rel = str(path.relative_to(REPO))
        own = _layer(rel)
        assert own is not None, f'{rel} belongs to no layer: add it to LAYERS and docs/architecture.md'
        for module in _imports(path):
            target = _module_layer(module)
            if target is not None and target > own:
                found.append(f'{rel} ({LAYERS[own][0]}) imports {module} ({LAYERS[target][0]})')
    return sorted(set(found))


def test_every_import_points_down_the_pipeline():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / 'diffusion' / 'models'
    fake.mkdir(parents=True)
    (fake / 'bad.py').write_text('def f():\n    from diffusion.evaluation.generate import run\n')
    monkeypatch.setattr(__import__(__name__), 'REPO', tmp_path)
    assert upward_imports() == ['diffusion/models/bad.py (models) imports diffusion.evaluation.generate '
                                '(evaluation and export)']


def test_setup_installs_every_package(monkeypatch):
    """A non-editable ``pip install .`` gets every folder of diffusion/ with an __init__.py, and callbacks/ as
    diffusion.callbacks: the package list setup.py hands to setuptools is read by running setup.py."""
    import runpy

    import setuptools
    seen = {}
    monkeypatch.setattr(setuptools, 'setup', lambda **kwargs: seen.update(kwargs))
    monkeypatch.chdir(REPO)  # setup.py runs from the source folder, as pip runs it
    runpy.run_path(str(REPO / 'setup.py'))
    folders = {'.'.join(p.parent.relative_to(REPO).parts) for p in REPO.glob('diffusion/**/__init__.py')}
    assert {'diffusion', 'diffusion.training', 'diffusion.models'} <= folders  # the glob sees them
    assert set(seen['packages']) == folders | {'diffusion.callbacks'}
    assert seen['package_dir'] == {'diffusion': 'diffusion', 'diffusion.callbacks': 'callbacks'}
