"""Train a model: `composer run.py yamls/CONFIG.yaml [key.path=value ...]` (or `python run.py ...` on one process)."""
import sys

from diffusion.training.train import main

if __name__ == '__main__':
    sys.exit(main())
