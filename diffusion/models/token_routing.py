"""TREAD token routing for a transformer backbone's blocks (Krause et al., "TREAD: Token Routing for Efficient
Architecture-agnostic Diffusion Training", ICCV 2025).

In training, a random subset of the tokens (a fraction ``ratio`` of them, drawn per sample) skips a contiguous range
of blocks ``[start, end)``: the other tokens go through those blocks alone, and the routed ones rejoin, in their
places and exactly as they were when they left, after block ``end - 1``. Unlike masking, no token is lost: every
token passes through the blocks outside the range, every output position is predicted, and the loss covers all of
them. The blocks in the range see fewer tokens, so they cost less (attention more than linearly).

Routing happens only in training mode with ``ratio > 0``; evaluation and sampling run every token through every
block (the plain model). ``ratio = 0`` runs the plain model itself, bit for bit.

MicroDiT takes it as the backbone option ``tread: {ratio: 0.5, start: 2, end: 6}`` (``end`` excluded; TREAD's
paper routes from the second block to a few blocks before the last). It composes with deferred masking (routing
draws from the tokens masking kept), with the patch-mixer (which runs before the backbone blocks and is never
routed) and with the expert-choice MoE (its per-expert capacity follows the number of tokens a block sees).
The draw happens outside the blocks, so activation checkpointing's recomputation of a block sees the same tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ['TreadConfig', 'tread_config', 'route_tokens', 'rejoin_tokens', 'run_blocks']


@dataclasses.dataclass(frozen=True)
class TreadConfig:
    """Route a fraction ``ratio`` of the tokens around blocks ``start .. end - 1``."""
    ratio: float
    start: int
    end: int


def tread_config(value: Optional[Mapping[str, Any]], depth: int) -> Optional[TreadConfig]:
    """A :class:`TreadConfig` from a ``{ratio, start, end}`` block (None: no routing), checked against ``depth``.

    Raises:
        ValueError: An unknown or missing key, ``ratio`` outside ``[0, 1)`` or not ``0 <= start < end <= depth``.
    """
    if value is None:
        return None
    if isinstance(value, TreadConfig):
        value = dataclasses.asdict(value)
    keys = {'ratio', 'start', 'end'}
    if set(value) != keys:
        raise ValueError(f'tread needs exactly the keys {sorted(keys)}, got {sorted(value)}')
    cfg = TreadConfig(float(value['ratio']), int(value['start']), int(value['end']))
    if not 0.0 <= cfg.ratio < 1.0:
        raise ValueError(f'tread ratio must be in [0, 1), got {cfg.ratio}')
    if not 0 <= cfg.start < cfg.end <= depth:
        raise ValueError(f'tread needs 0 <= start < end <= depth ({depth}), got start {cfg.start}, end {cfg.end}')
    return cfg


@dataclasses.dataclass
class Route:
    """What rejoining needs: the full token states when the range began and the indices that went through it."""
    states: Tensor  # (N, T, D)
    ids_kept: Tensor  # (N, K)


def route_tokens(x: Tensor, ratio: float,
                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, Route]:
    """Keep ``T - int(T * ratio)`` uniformly random tokens per sample: (N, T, D) -> (N, K, D) and the route.

    The kept tokens stay in their original order (sorted indices), so a block sees them as the plain model would,
    minus the routed ones.
    """
    n, tokens, dim = x.shape
    kept = tokens - int(tokens * ratio)
    scores = torch.rand(n, tokens, device=x.device, generator=generator)  # (N, T)
    ids_kept = scores.argsort(dim=1)[:, :kept].sort(dim=1).values  # (N, K)
    return x.gather(1, ids_kept.unsqueeze(-1).expand(-1, -1, dim)), Route(x, ids_kept)


def rejoin_tokens(x_kept: Tensor, route: Route) -> Tensor:
    """The kept tokens' new states in their places, the routed tokens' states from before the range: (N, T, D).

    Differentiable with respect to both (the routed tokens' gradient goes straight to where they left).
    """
    index = route.ids_kept.unsqueeze(-1).expand(-1, -1, route.states.shape[-1])
    return route.states.scatter(1, index, x_kept.to(route.states.dtype))


def run_blocks(blocks: Sequence[nn.Module], x: Tensor, call: Callable[[nn.Module, Tensor], Tensor],
               routing: Optional[TreadConfig], generator: Optional[torch.Generator] = None) -> Tensor:
    """``x = call(block, x)`` for each block in turn; with ``routing`` (and ``ratio > 0``) the routed tokens skip
    blocks ``start .. end - 1``. ``routing=None`` is the plain loop."""
    if routing is None or routing.ratio == 0.0:
        for block in blocks:
            x = call(block, x)
        return x
    for block in blocks[:routing.start]:
        x = call(block, x)
    x, route = route_tokens(x, routing.ratio, generator)  # (N, K, D)
    for block in blocks[routing.start:routing.end]:
        x = call(block, x)
    x = rejoin_tokens(x, route)  # (N, T, D)
    for block in blocks[routing.end:]:
        x = call(block, x)
    return x
