"""The demo (``make demo``, ``scripts/demo.py``): the code only the demo and its studies use.

``photos`` (a tiny set of real photos shipped by installed packages, with ``photos.json``: the dataset the tiny
configs train on), ``probe`` (the linear category probe on Inception features), ``evaluate`` (one trained
model's FID/KID, probe and guidance sweep: ``python -m diffusion.demo.evaluate``), ``report`` (the demo's report
and model card), ``own_data`` (the demo's route on a user's own captioned images) and ``studies`` (what
``scripts/leakage_study.py`` and ``scripts/transfer_study.py`` share).

This package sits on top of the library: it imports from every layer, and nothing in the library imports it.
"""
