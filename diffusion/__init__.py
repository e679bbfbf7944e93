"""CommonCanvas-style text-to-image diffusion recipes on Composer and Streaming.

Kept import-light on purpose: ``import diffusion.data.sanitize`` must not pull in composer or llm-foundry.
Components register themselves when their modules are imported (see ``diffusion.builders.import_components``).
"""
__version__ = '0.1.0'
