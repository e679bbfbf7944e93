"""Composer callbacks, installed as ``diffusion.callbacks``. Importing this package registers each one by name."""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{_info.name}')
