"""Checkpoints without the frozen encoders: they are rebuilt from the config, not saved with every checkpoint.

``LatentDiffusion``'s autoencoder and text encoder never train (``requires_grad`` False). Their weights come from the
config (a pretrained folder or hub name, or a random initialisation with a fixed seed), so saving them in every
checkpoint only costs disk and time: 1.75 GB for SD2's, 3.6 GB for SDXL's, 91 MB of MiniLM next to a 38 MB UNet.

Two hooks on the model do it, for every path that saves or loads it through ``state_dict``:

* :func:`leave_out_frozen_parts` (a ``state_dict`` post-hook) drops the keys of a frozen part from the model's
  state dict. Composer builds its checkpoints from it (``State.get_model_state_dict`` -> ``model.state_dict()``),
  for full and for sharded checkpoints alike, and also builds the template a sharded checkpoint is read into from
  it, so saving and loading agree.
* :func:`fill_in_frozen_parts` (a ``load_state_dict`` pre-hook) supplies a part a checkpoint does not carry from
  the model's own (rebuilt) weights, so strict loads pass: composer's autoresume, ``load_path`` with or without
  ``load_weights_only``, ``diffusion.checkpoints.load_model``. A checkpoint that carries a part (one written
  before this change) loads it as before.

A part with any trainable parameter is kept (it is not frozen). ``include_frozen_parts`` switches the first hook off
for a ``state_dict`` that must be complete (the native export's ``model.safetensors``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

__all__ = ['FROZEN_PARTS', 'fill_in_frozen_parts', 'frozen_parts', 'include_frozen_parts', 'leave_out_frozen_parts']

# The children of LatentDiffusion that are frozen by construction.
FROZEN_PARTS = ('autoencoder', 'text_encoder')
_INCLUDE_FLAG = '_state_dict_includes_frozen_parts'


def frozen_parts(model: nn.Module) -> list[str]:
    """The names of ``model``'s parts in :data:`FROZEN_PARTS` that exist and have no trainable parameter."""
    parts = []
    for name in FROZEN_PARTS:
        part = getattr(model, name, None)
        if isinstance(part, nn.Module) and not any(p.requires_grad for p in part.parameters()):
            parts.append(name)
    return parts


def leave_out_frozen_parts(model: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook: remove the keys of the frozen parts (``<prefix><part>.``)."""
    if getattr(model, _INCLUDE_FLAG, False):
        return
    starts = tuple(f'{prefix}{name}.' for name in frozen_parts(model))
    if starts:
        for key in [k for k in state_dict if k.startswith(starts)]:
            del state_dict[key]


def fill_in_frozen_parts(model: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: a frozen part the incoming state dict has no key of keeps its own weights."""
    for name in frozen_parts(model):
        start = f'{prefix}{name}.'
        if any(key.startswith(start) for key in state_dict):
            continue  # the checkpoint carries this part: it is loaded
        state_dict.update(getattr(model, name).state_dict(prefix=start))


@contextlib.contextmanager
def include_frozen_parts(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model.state_dict()`` is complete (frozen parts included)."""
    setattr(model, _INCLUDE_FLAG, True)
    try:
        yield model
    finally:
        setattr(model, _INCLUDE_FLAG, False)
