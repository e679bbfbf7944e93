"""Training: the composer Trainer a config describes (train.py), the dry run (dry_run.py), kill-safe checkpoints
(checkpointing.py) and the one module that patches composer internals (composer_compat.py)."""
