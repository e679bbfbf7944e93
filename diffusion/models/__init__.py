"""Models. Importing this package registers every model, backbone, text encoder and autoencoder by name."""
import importlib
import pkgutil

# Import every module of the package so each one's registry entries exist; a broken module fails loudly here.
for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{_info.name}')
