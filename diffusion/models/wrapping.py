"""The model inside a training wrapper: DDP (torch's, or composer's) holds the ComposerModel as ``.module``."""
from __future__ import annotations

from typing import Any

__all__ = ['unwrap']


def unwrap(model: Any) -> Any:
    """``model.module`` for a wrapped model (DDP), else ``model`` itself."""
    return model.module if hasattr(model, 'module') else model
