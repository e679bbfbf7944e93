"""Export: ``checkpoint`` (rebuild a trained model from a composer checkpoint and its ``config.yaml``) and
``to_diffusers`` (write it as a diffusers pipeline folder). ``convert/export_diffusers.py`` calls these."""
