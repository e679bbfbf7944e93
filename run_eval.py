"""Evaluate a checkpoint (FID / KID / CLIP score over guidance scales): `python run_eval.py yamls/eval/CONFIG.yaml`."""
import sys

from diffusion.evaluation.evaluate import main

if __name__ == '__main__':
    sys.exit(main())
