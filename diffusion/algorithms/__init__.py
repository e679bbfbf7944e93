"""Composer algorithms of this project. Importing this package registers each one by name in
``diffusion.registry.algorithms`` (composer's and llm-foundry's own algorithms are registered there already).

One module per algorithm: a plain function that does the work (usable without a Trainer) and a small
``composer.core.Algorithm`` with ``match``/``apply``.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{_info.name}')
