"""Generate images from a prompt file: `python run_generate.py yamls/generate/CONFIG.yaml [key=value ...]`."""
import sys

from diffusion.evaluation.generate import main

if __name__ == '__main__':
    sys.exit(main())
