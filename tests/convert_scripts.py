"""The scripts of ``convert/`` as modules, for tests that call their ``main`` or ``parse_args`` in process."""
import importlib.util
from pathlib import Path
from types import ModuleType

CONVERT = Path(__file__).resolve().parents[1] / 'convert'


def load_convert_script(name: str) -> ModuleType:
    """Import ``convert/<name>.py`` as the module ``convert_<name>``."""
    spec = importlib.util.spec_from_file_location(f'convert_{name}', CONVERT / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
