"""Evaluation: ``generate`` (images from prompts and seeds), ``metrics`` (FID, KID, CLIP score) and ``evaluate``
(a guidance sweep against reference images). The ``run_generate.py`` and ``run_eval.py`` entry points call these."""
