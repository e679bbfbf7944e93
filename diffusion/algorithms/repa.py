"""REPA, representation alignment (Yu et al., "Representation Alignment for Generation: Training Diffusion
Transformers Is Easier Than You Think", 2024), as an opt-in Composer algorithm.

A small MLP (the projector) maps the backbone's hidden tokens after one block to the width of a frozen,
pretrained image encoder's patch features; the extra loss is the negative mean cosine similarity between each
projected token and the encoder's feature of the clean image at the same place,

    repa = -mean over samples and tokens of cos(projector(h_i), f_i),

and training minimises ``diffusion loss + weight * repa`` (the paper's weight is 0.5). Its gradient reaches the
projector and the backbone up to the aligned block; the encoder is frozen, in eval mode, and computes its features
without a graph.

How it is wired (nothing in the model's code changes):

* Event.INIT: the algorithm builds the encoder and the projector (seeded on a random stream of their own, so the
  global stream and every other initialisation stay as without REPA), attaches the projector to the ComposerModel
  as ``repa_projector`` (so it moves with the model, DDP wraps it, and the optimizer's state names it), adds its
  parameters to the optimizer as a parameter group of their own (the optimizer's defaults; the learning-rate
  scheduler, compiled after INIT, drives it like the others), and registers a forward hook on the aligned block.
* Event.BEFORE_FORWARD arms the hook; the training forward's call of the block stores its output (once).
* Event.AFTER_LOSS: the encoder's features of the batch's clean images, the projected tokens and the cosine loss;
  ``state.loss`` becomes ``loss + weight * repa``, so composer's ``loss/train/total`` includes the term. The
  algorithm also logs ``loss/train/repa`` (the unweighted cosine term) and ``loss/train/diffusion``.

Checkpoints: the encoder is never part of the model or of any state dict; it is rebuilt from the config. The
projector is saved in the algorithm's own state (composer saves and restores each algorithm's ``state_dict``),
and is left out of the model's state dict, so a REPA run's weights load, export and generate exactly as a run
without REPA (the projector is a training-time head: nothing uses it at sampling). Its optimizer moments are in
the optimizer's state under ``repa_projector.*``, so an autoresumed run continues bit-exactly. A run started with
``load_weights_only`` starts a fresh projector.

Clean images: the batch's ``image`` (pixel datasets) when it has one; a batch of precomputed latents (the demo's
datasets) is decoded with the model's frozen autoencoder (one VAE decoder pass per step, without a graph).

Which block: MicroDiT's ``blocks[block]`` (default ``depth // 4``: the 8th of SiT-XL's 28 blocks, REPA's setting);
a UNet backbone aligns its mid block's output (``block`` must then be unset). The aligned block must see every
token: deferred masking (``mask_ratio > 0``) drops tokens in an order the backbone does not expose, so REPA
refuses a masked step, and with TREAD the block must lie outside the routed range.

Encoders (:func:`build_feature_encoder`): ``inception`` (the TF-FID InceptionV3 the evaluation already ships, a
17x17x768 map), ``torchvision:<model>``, ``timm:<model>`` and ``transformers:<hub id or folder>`` (REPA's DINOv2:
``transformers:facebook/dinov2-base``; the weights must be in the local hub cache). The pretrained encoders'
training data (ImageNet, DINOv2's LVD-142M) is not Creative-Commons licensed: a model meant to be trained on CC
images only should not use REPA with them (docs/microdit.md, "REPA").
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from torch import Tensor, nn

from diffusion import registry
from diffusion.models.feature_encoders import FeatureEncoder, build_feature_encoder
from diffusion.models.wrapping import unwrap

log = logging.getLogger(__name__)

__all__ = ['FeatureEncoder', 'Repa', 'align_features', 'alignment_block', 'build_feature_encoder', 'build_projector',
           'repa_loss']

PROJECTOR_NAME = 'repa_projector'

# =============================================================================================
# The loss
# =============================================================================================


def repa_loss(projected: Tensor, features: Tensor) -> Tensor:
    """Negative mean cosine similarity of matching tokens: (B, T, C) and (B, T, C) -> a scalar in [-1, 1].

    -1 when every projected token points the way of its feature. Computed in float32.
    """
    if projected.shape != features.shape:
        raise ValueError(f'REPA: projected tokens {tuple(projected.shape)} and encoder features '
                         f'{tuple(features.shape)} differ in shape')
    return -F.cosine_similarity(projected.float(), features.float(), dim=-1).mean()


def align_features(features: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """Encoder patch features on their ``grid`` (B, h*w, C) -> on the backbone's token grid (B, H*W, C).

    Bilinear interpolation of the feature map (antialiased when it shrinks); the same grid is returned as it is.
    """
    if tuple(grid) == tuple(target):
        return features
    b, n, c = features.shape
    fmap = features.transpose(1, 2).reshape(b, c, *grid)  # (B, C, h, w)
    fmap = F.interpolate(fmap.float(), size=target, mode='bilinear', align_corners=False,
                         antialias=target[0] < grid[0] or target[1] < grid[1])
    return fmap.flatten(2).transpose(1, 2)  # (B, H*W, C)


def build_projector(in_dim: int, out_dim: int, hidden_dim: int = 2048) -> nn.Sequential:
    """REPA's projector: three linear layers with SiLU between them, ``in_dim -> hidden -> hidden -> out_dim``."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
                         nn.Linear(hidden_dim, out_dim))


# =============================================================================================
# The aligned block
# =============================================================================================


def alignment_block(backbone: nn.Module, block: Optional[int] = None) -> tuple[nn.Module, str, int]:
    """The module whose output REPA aligns, its name and its output width.

    A transformer with ``blocks`` (MicroDiT): ``blocks[block]``, default ``depth // 4``; it must lie outside a TREAD
    range. A UNet backbone (``backbone.unet.mid_block``): the mid block (``block`` unset).
    """
    blocks = getattr(backbone, 'blocks', None)
    if isinstance(blocks, nn.ModuleList):
        depth = len(blocks)
        index = depth // 4 if block is None else int(block)
        if not 0 <= index < depth:
            raise ValueError(f'repa.block must be in [0, {depth}) for this backbone of {depth} blocks, got {index}')
        tread = getattr(backbone, 'tread', None)
        if tread is not None and tread.ratio > 0 and tread.start <= index < tread.end:
            raise ValueError(f'repa.block {index} lies in the TREAD range [{tread.start}, {tread.end}), where the '
                             'block sees only part of the tokens: choose a block outside it')
        return blocks[index], f'blocks.{index}', int(backbone.config.dim)
    mid = getattr(getattr(backbone, 'unet', None), 'mid_block', None)
    if mid is not None:
        if block is not None:
            raise ValueError('repa.block: a UNet backbone aligns its mid block; leave block unset')
        return mid, 'unet.mid_block', int(backbone.unet.config.block_out_channels[-1])
    raise ValueError(f'REPA supports MicroDiT (blocks) and UNet (mid block) backbones, not {type(backbone).__name__}')


# =============================================================================================
# The algorithm
# =============================================================================================


class Repa(Algorithm):
    """REPA (YAML: ``algorithms: {repa: {encoder: inception, weight: 0.5}}``); see the module docstring.

    Args:
        encoder: A :func:`build_feature_encoder` name.
        encoder_options: Its options (e.g. ``{weights: DEFAULT}`` for torchvision, ``{revision: ...}``).
        weight: The loss weight lambda (REPA: 0.5). 0 switches the algorithm off entirely: training is then the
            same, bit for bit, as without it (no projector, no hook, no encoder pass).
        block: The aligned MicroDiT block (0-based; default ``depth // 4``). Unset for a UNet (its mid block).
        projector_dim: The projector's hidden width (REPA: 2048).
        source: Where the clean images come from: ``auto`` (the batch's ``image``, else decoded latents),
            ``image`` or ``decode``.
        seed: Seed of the projector's initialisation (drawn on a generator of its own).
    """

    def __init__(self, encoder: str = 'inception', encoder_options: Optional[dict[str, Any]] = None,
                 weight: float = 0.5, block: Optional[int] = None, projector_dim: int = 2048, source: str = 'auto',
                 seed: int = 0) -> None:
        if source not in ('auto', 'image', 'decode'):
            raise ValueError(f"repa.source must be 'auto', 'image' or 'decode', got {source!r}")
        if weight < 0:
            raise ValueError(f'repa.weight must be >= 0, got {weight}')
        self.encoder_name, self.encoder_options = encoder, dict(encoder_options or {})
        self.weight, self.block, self.projector_dim = float(weight), block, int(projector_dim)
        self.source, self.seed = source, int(seed)
        self.encoder: Optional[FeatureEncoder] = None  # built at INIT; never in a state dict
        self.projector: Optional[nn.Module] = None
        self._handle: Any = None
        self._armed = False
        self._captured: Optional[Tensor] = None
        self._pending: Optional[dict[str, Tensor]] = None  # projector weights from a checkpoint read before INIT

    def __repr__(self) -> str:
        return (f'Repa(encoder={self.encoder_name!r}, weight={self.weight}, block={self.block}, '
                f'projector_dim={self.projector_dim}, source={self.source!r})')

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.projector is not None:
            state['projector'] = {k: v.detach().cpu().clone() for k, v in self.projector.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state.get('projector')
        if weights is None:
            return
        if self.projector is None:
            self._pending = dict(weights)
        else:
            self.projector.load_state_dict(weights)

    # ------------------------------------------------------------------ events
    def match(self, event: Event, state: State) -> bool:
        if self.weight == 0:
            return False
        return event in (Event.INIT, Event.FIT_START, Event.BEFORE_FORWARD, Event.AFTER_LOSS)

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        if event == Event.INIT:
            self._attach(state)
        elif event == Event.FIT_START:
            device = next(self.projector.parameters()).device
            self.encoder.to(device)
        elif event == Event.BEFORE_FORWARD:
            self._armed, self._captured = True, None
        else:
            self._add_loss(state, logger)
        return None

    def _attach(self, state: State) -> None:
        model = state.model
        if hasattr(model, PROJECTOR_NAME):
            raise ValueError('the model already has a repa_projector: give the repa algorithm once')
        module, where, width = alignment_block(model.backbone, self.block)
        ref = next(model.backbone.parameters())
        # Seeded on a stream of their own: the global random stream is left as it was, and every rank builds the
        # same projector (and the same encoder, when it is a random one).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.encoder = build_feature_encoder(self.encoder_name, **self.encoder_options)
            projector = build_projector(width, self.encoder.dim, self.projector_dim)
        self.projector = projector.to(ref.device)
        if self._pending is not None:
            self.projector.load_state_dict(self._pending)
            self._pending = None
        setattr(model, PROJECTOR_NAME, self.projector)
        # The projector is saved in this algorithm's state, not in the model's (see the module docstring).
        model.register_state_dict_post_hook(_leave_out_projector)
        model.register_load_state_dict_pre_hook(_fill_in_projector)
        if not state.optimizers:
            raise ValueError('REPA needs the optimizer at INIT (give it to the Trainer) to train its projector')
        state.optimizers[0].add_param_group({'params': list(self.projector.parameters())})
        self._handle = module.register_forward_hook(self._capture)
        log.info('repa: aligning %s (width %d) with %s features (%d-d on a %dx%d grid), weight %g, projector %.2fM '
                 'parameters', where, width, self.encoder.name, self.encoder.dim, *self.encoder.grid, self.weight,
                 sum(p.numel() for p in self.projector.parameters()) / 1e6)

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._armed and module.training and torch.is_grad_enabled():
            self._captured, self._armed = output, False

    def clean_images(self, batch: dict[str, Any], model: nn.Module) -> Tensor:
        """The batch's clean images in [-1, 1]: ``image`` when the batch has it (and ``source`` allows), else the
        latents decoded by the model's frozen autoencoder."""
        if self.source != 'decode' and 'image' in batch:
            return batch['image']
        if self.source == 'image':
            raise KeyError("repa.source is 'image' but the batch has no `image` (a dataset of precomputed latents): "
                           "use source 'auto' or 'decode'")
        if getattr(model, 'autoencoder', None) is None:
            raise RuntimeError('REPA on precomputed latents decodes them with the model\'s autoencoder, and this '
                               'model has none')
        with torch.no_grad():
            return model.autoencoder.decode(model.unscale(model.batch_latents(batch))).float().clamp(-1, 1)

    def _add_loss(self, state: State, logger: Logger) -> None:
        hidden, self._captured, self._armed = self._captured, None, False
        if hidden is None:
            raise RuntimeError('REPA: the aligned block did not run in this training forward')
        model = unwrap(state.model)
        outputs = state.outputs
        if isinstance(outputs, (tuple, list)) and len(outputs) > 3 and outputs[3] is not None:
            raise ValueError('REPA needs every token at the aligned block, and this step masked patches (MicroDiT '
                             'deferred masking, mask_ratio > 0): train with mask_ratio 0 (no mask_schedule)')
        if hidden.dim() == 4:  # a UNet block's map (B, C, h, w)
            grid = (int(hidden.shape[2]), int(hidden.shape[3]))
            tokens = hidden.flatten(2).transpose(1, 2)
        else:  # transformer tokens (B, T, D) on the latent grid / patch size
            patch = int(model.backbone.config.patch_size)
            h, w = outputs[0].shape[-2:]
            grid, tokens = (h // patch, w // patch), hidden
            if tokens.shape[1] != grid[0] * grid[1]:
                raise ValueError(f'REPA: the aligned block saw {tokens.shape[1]} tokens, not the {grid[0] * grid[1]} '
                                 'of the grid (masking or token routing there)')
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            feats = self.encoder(self.clean_images(state.batch, model).to(tokens.device))  # (B, N, C)
        target = align_features(feats.float(), self.encoder.grid, grid)  # (B, T, C)
        with get_precision_context(state.precision, state.precision_config):
            projected = model.repa_projector(tokens)  # (B, T, C)
        term = repa_loss(projected, target)
        base = state.loss
        if isinstance(base, dict):
            state.loss = {**base, 'total': base['total'] + self.weight * term, 'repa': term}
            base = base['total']
        else:
            state.loss = base + self.weight * term
        logger.log_metrics({'loss/train/repa': term.detach(), 'loss/train/diffusion': base.detach()})


def _leave_out_projector(model: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook: drop ``<prefix>repa_projector.*`` (the algorithm's state carries it)."""
    start = f'{prefix}{PROJECTOR_NAME}.'
    for key in [k for k in state_dict if k.startswith(start)]:
        del state_dict[key]


def _fill_in_projector(model: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: the projector keeps its own weights when the state dict has none of it."""
    start = f'{prefix}{PROJECTOR_NAME}.'
    if not any(key.startswith(start) for key in state_dict):
        state_dict.update(getattr(model, PROJECTOR_NAME).state_dict(prefix=start))


registry.algorithms.register('repa', func=Repa)
