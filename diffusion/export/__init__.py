"""Export: ``to_diffusers`` (write a trained model as a diffusers pipeline folder) and ``native`` (this project's
own folder format). Models are rebuilt from a run with ``diffusion.checkpoints.load_model``;
``convert/export_diffusers.py`` calls these."""
