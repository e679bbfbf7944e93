"""Frozen image encoders that return patch tokens, by name: REPA's feature encoders
(:mod:`diffusion.algorithms.repa`).

``inception`` (the TF-FID InceptionV3 the evaluation ships), ``torchvision:<model>``, ``timm:<model>`` and
``transformers:<hub id or folder>`` (REPA's DINOv2: ``transformers:facebook/dinov2-base``, the weights in the
local hub cache). The pretrained encoders' training data (ImageNet, DINOv2's LVD-142M) is not Creative-Commons
licensed.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['FeatureEncoder', 'build_feature_encoder']

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureEncoder(nn.Module):
    """A frozen image encoder that returns patch tokens.

    ``forward(images)``: images (B, 3, H, W) in [-1, 1] -> patch features (B, N, C) with ``N = grid[0] * grid[1]``,
    row-major over the encoder's feature grid. The images are resized to ``image_size`` (bicubic, antialiased) and
    normalised with ``mean`` / ``std`` (of [0, 1] pixels) before ``features`` runs the network.

    The module never trains: ``requires_grad`` is off, ``train()`` keeps it in eval mode, and the forward runs
    without a graph. ``dim`` and ``grid`` are measured once at construction with a blank image.

    Args:
        net: The network.
        features: ``features(net, x)`` -> a map (B, C, h, w) or tokens (B, N, C) of a square grid.
        image_size: The side the images are resized to.
        mean: Per-channel mean of [0, 1] pixels subtracted before the network.
        std: Per-channel std divided by.
        name: The encoder's name (for messages).
    """

    def __init__(self, net: nn.Module, features: Callable[[nn.Module, Tensor], Tensor], image_size: int,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 name: str = '') -> None:
        super().__init__()
        self.net, self._features, self.image_size, self.name = net, features, int(image_size), name
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            tokens, self.grid = self._tokens(torch.zeros(1, 3, self.image_size, self.image_size))
        self.dim = int(tokens.shape[-1])

    def train(self, mode: bool = True) -> 'FeatureEncoder':
        return super().train(False)

    def _tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode='bicubic',
                          align_corners=False, antialias=True)
        x = ((x.clamp(-1, 1) + 1) / 2 - self.mean) / self.std
        out = self._features(self.net, x)
        if out.dim() == 4:  # a feature map (B, C, h, w)
            return out.flatten(2).transpose(1, 2), (int(out.shape[2]), int(out.shape[3]))
        side = math.isqrt(out.shape[1])
        if side * side != out.shape[1]:
            raise ValueError(f'feature encoder {self.name!r}: {out.shape[1]} tokens are not a square grid')
        return out, (side, side)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self._tokens(images)[0]


def _inception(layer: str = 'mixed_7', image_size: int = 299, **kwargs: Any) -> FeatureEncoder:
    """The TF-FID InceptionV3 (``diffusion.evaluation.metrics``), run up to ``layer`` (default ``mixed_7``:
    768 channels on a 17x17 grid at 299 px). Its input range is TF's: pixels / 128 - 1."""
    if kwargs:
        raise ValueError(f'feature encoder inception: unknown option(s) {sorted(kwargs)}')
    from diffusion.models.inception import inception_path
    layers = torch.jit.load(str(inception_path()), map_location='cpu').net.layers
    names = [name for name, _ in layers.named_children()]
    if layer not in names or layer == names[-1]:
        raise ValueError(f'feature encoder inception: layer {layer!r} is not one of {names[:-1]}')
    stages = [module for _, module in layers.named_children()][:names.index(layer) + 1]

    def features(net: nn.Module, x: Tensor) -> Tensor:
        del net
        for stage in stages:
            x = stage(x)
        return x  # (B, C, h, w)

    # [0, 1] pixels p -> 255 p / 128 - 1, written as (p - mean) / std with mean 128/255, std 128/255.
    mid = 128.0 / 255.0
    return FeatureEncoder(layers, features, image_size, (mid,) * 3, (mid,) * 3, name='inception')


def _torchvision(model: str, weights: Optional[str] = None, image_size: int = 224, **kwargs: Any) -> FeatureEncoder:
    """A torchvision classifier's last feature map (CNNs) or its encoder's patch tokens (ViTs).

    ``weights``: a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``...) or None for a random network.
    """
    import torchvision
    net = torchvision.models.get_model(model, weights=weights, **kwargs)
    if isinstance(net, torchvision.models.VisionTransformer):
        def features(vit: nn.Module, x: Tensor) -> Tensor:
            tokens = vit._process_input(x)  # (B, N, D)
            tokens = torch.cat([vit.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            return vit.encoder(tokens)[:, 1:]  # the patch tokens, without the class token
    elif hasattr(net, 'avgpool') and hasattr(net, 'fc'):  # ResNet family: every stage before the pooling
        def features(cnn: nn.Module, x: Tensor) -> Tensor:
            for name, child in cnn.named_children():
                if name in ('avgpool', 'fc'):
                    break
                x = child(x)
            return x
    elif isinstance(getattr(net, 'features', None), nn.Module):  # VGG, EfficientNet, ConvNeXt, MobileNet...
        def features(cnn: nn.Module, x: Tensor) -> Tensor:
            return cnn.features(x)
    else:
        raise ValueError(f'feature encoder torchvision:{model}: no feature map found (expected a ViT, a ResNet-style '
                         'network or one with a `features` module)')
    return FeatureEncoder(net, features, image_size, name=f'torchvision:{model}')


def _timm(model: str, pretrained: bool = True, image_size: int = 224, **kwargs: Any) -> FeatureEncoder:
    """A timm model's ``forward_features``: a map, or tokens without the model's prefix (class, register) tokens."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(f'feature encoder timm:{model} needs the timm package (not installed)') from err
    net = timm.create_model(model, pretrained=pretrained, num_classes=0, **kwargs)

    def features(m: nn.Module, x: Tensor) -> Tensor:
        out = m.forward_features(x)
        return out if out.dim() == 4 else out[:, int(getattr(m, 'num_prefix_tokens', 0)):]

    return FeatureEncoder(net, features, image_size, name=f'timm:{model}')


def _transformers(model: str, image_size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN,
                  std: tuple[float, ...] = IMAGENET_STD, **kwargs: Any) -> FeatureEncoder:
    """A transformers vision model (``AutoModel``) by hub id or local folder, e.g. REPA's DINOv2
    ``facebook/dinov2-base`` (patch 14: a 16x16 grid at 224 px). The patch tokens are the last ones of
    ``last_hidden_state``; the leading class and register tokens are dropped."""
    from transformers import AutoModel
    net = AutoModel.from_pretrained(model, **kwargs)
    patch = int(net.config.patch_size)

    def features(m: nn.Module, x: Tensor) -> Tensor:
        hidden = m(pixel_values=x).last_hidden_state  # (B, prefix + N, C)
        n = (x.shape[-2] // patch) * (x.shape[-1] // patch)
        return hidden[:, hidden.shape[1] - n:]

    return FeatureEncoder(net, features, image_size, tuple(mean), tuple(std), name=f'transformers:{model}')


def build_feature_encoder(name: str, **options: Any) -> FeatureEncoder:
    """A frozen :class:`FeatureEncoder` by name.

    Args:
        name: ``inception``; ``torchvision:<model>`` (options ``weights``, ``image_size``, model kwargs);
            ``timm:<model>`` (``pretrained``, ``image_size``); ``transformers:<hub id or folder>`` (``image_size``,
            ``mean``, ``std``, ``from_pretrained`` kwargs such as ``revision``). REPA's encoder is
            ``transformers:facebook/dinov2-base`` (or ``-large``, ``-giant``).
        **options: The options above.
    """
    kind, _, model = name.partition(':')
    if kind == 'inception' and not model:
        return _inception(**options)
    builders = {'torchvision': _torchvision, 'timm': _timm, 'transformers': _transformers}
    if kind not in builders or not model:
        raise ValueError(f'unknown feature encoder {name!r}; expected inception, torchvision:<model>, '
                         'timm:<model> or transformers:<hub id or folder>')
    return builders[kind](model, **options)
