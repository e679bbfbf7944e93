"""Synthetic captions ("telephoning", CommonCanvas section 3): any Hugging Face image-to-text model.

CommonCanvas captioned CommonCatalog with BLIP-2 (``Salesforce/blip2-opt-2.7b``) after centre-cropping and
resizing every image to 512x512. The paper does not give its decoding settings; ours are
:data:`DEFAULT_GENERATION` (deterministic beam search, short captions, no repeated trigrams) and every one is a
command-line option of ``convert/caption.py``.

Captioners produce degenerate text now and then (nothing, a word repeated, the prompt echoed back).
:func:`degenerate_reason` names the problem so the converter can keep the original caption instead and count it.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from diffusion.data.dataset import center_crop

log = logging.getLogger(__name__)

__all__ = ['DEFAULT_MODEL', 'DEFAULT_GENERATION', 'Captioner', 'GenerationSettings', 'strip_prompt',
           'degenerate_reason']

DEFAULT_MODEL = 'Salesforce/blip2-opt-2.7b'


@dataclass
class GenerationSettings:
    """Decoding settings passed to ``model.generate``.

    Defaults (our choice; the paper gives none): beam search with 3 beams is deterministic, so a resumed or
    re-run conversion writes the same captions; 30 new tokens fit a one-sentence caption; trigrams may not repeat
    inside a caption (``no_repeat_ngram_size=3``), which removes most "a a a a" loops at the source.
    """
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    num_beams: int = 3
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 3

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate`` (sampling knobs only when sampling)."""
        kw: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                                  num_beams=self.num_beams, do_sample=self.do_sample,
                                  repetition_penalty=self.repetition_penalty,
                                  no_repeat_ngram_size=self.no_repeat_ngram_size)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        return kw


DEFAULT_GENERATION = GenerationSettings()


# ---------------------------------------------------------------------------------------------
# Degenerate outputs
# ---------------------------------------------------------------------------------------------
_WORD = re.compile(r"[\w']+", re.UNICODE)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def degenerate_reason(caption: str, prompt: Optional[str] = None, min_words: int = 2, ngram: int = 2,
                      max_ngram_repeats: int = 2, max_word_share: float = 0.5) -> Optional[str]:
    """Why a generated caption is unusable, or ``None`` if it is fine.

    Args:
        caption: The generated text (prompt already removed).
        prompt: The prompt given to the captioner, if any.
        min_words: Fewer words than this is ``'empty'``.
        ngram: Length of the n-grams checked for repetition.
        max_ngram_repeats: An n-gram occurring more often than this is ``'repeated_ngram'``.
        max_word_share: One word making up more than this share of a caption of 4+ words is
            ``'repeated_ngram'`` too ("a a a cat a a").

    Returns:
        ``'empty'``, ``'prompt_echo'``, ``'repeated_ngram'`` or ``None``.
    """
    words = _words(caption)
    if len(words) < min_words:
        return 'empty'
    if prompt:
        pw = _words(prompt)
        # The whole caption is (a piece of) the prompt, or the prompt again followed by little else.
        if ' '.join(words) in ' '.join(pw) or (pw and words[:len(pw)] == pw and len(words) - len(pw) < min_words):
            return 'prompt_echo'
    grams = Counter(tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1))
    if grams and max(grams.values()) > max_ngram_repeats:
        return 'repeated_ngram'
    if len(words) >= 4 and max(Counter(words).values()) / len(words) > max_word_share:
        return 'repeated_ngram'
    return None


def strip_prompt(text: str, prompt: Optional[str] = None) -> str:
    """Normalise whitespace and drop a leading copy of the prompt (some models return it with the answer).

    Not :func:`diffusion.data.sanitize.clean_caption`, which validates and decodes a stored caption.
    """
    text = ' '.join(text.split())
    if prompt:
        p = ' '.join(prompt.split())
        if text.lower().startswith(p.lower()):
            text = text[len(p):].strip()
    return text


# ---------------------------------------------------------------------------------------------
# The captioner
# ---------------------------------------------------------------------------------------------
@dataclass
class Captioner:
    """A Hugging Face image-to-text model with its processor, in inference mode.

    Build with :meth:`from_pretrained`. Works with any model transformers loads through
    ``AutoModelForVision2Seq`` (BLIP, BLIP-2, InstructBLIP, ...), ``AutoModelForImageTextToText`` or, as a last
    resort, ``AutoModelForCausalLM`` (GIT).

    Attributes:
        model: The generator.
        processor: Its ``AutoProcessor`` (image processor + tokenizer).
        prompt: Text prefix given with every image (``None``: plain captioning).
        size: Images are centre-cropped and resized to ``size`` x ``size`` before the processor.
        generation: Decoding settings.
    """
    model: Any
    processor: Any
    prompt: Optional[str] = None
    size: int = 512
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, device: str = 'cpu', dtype: Optional[str] = None,
                        **kwargs: Any) -> 'Captioner':
        """Load a captioner by hub name or local folder.

        Args:
            name_or_path: Model name or folder (with the processor files next to the weights).
            device: ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ...
            dtype: ``'float32'``, ``'float16'`` or ``'bfloat16'``; default fp16 on GPU, fp32 on CPU.
            **kwargs: :class:`Captioner` fields (``prompt``, ``size``, ``generation``).
        """
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForVision2Seq
        from transformers import AutoProcessor
        dtype = dtype or ('float16' if device.startswith('cuda') else 'float32')
        if dtype not in ('float32', 'float16', 'bfloat16'):
            raise ValueError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
        if not device.startswith('cuda') and dtype == 'float16':
            raise ValueError('float16 inference needs a GPU; use float32 or bfloat16 on CPU')
        try:
            processor = AutoProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise OSError(f'Could not load the processor of captioner {name_or_path!r} (a local folder, or a hub '
                          f'name on a machine that can reach the hub): {err}') from err
        model, errors = None, []
        for auto in (AutoModelForVision2Seq, AutoModelForImageTextToText, AutoModelForCausalLM):
            try:
                model = auto.from_pretrained(name_or_path, torch_dtype=getattr(torch, dtype))
                break
            except ValueError as err:  # "Unrecognized configuration class ... for this kind of AutoModel"
                errors.append(f'{auto.__name__}: {err}')
            except OSError as err:
                raise OSError(f'Could not load the captioner {name_or_path!r}: {err}') from err
        if model is None:
            raise ValueError(f'{name_or_path!r} is not an image-to-text model transformers can load: '
                             + ' | '.join(errors))
        model.to(device).eval()
        log.info('captioner %s (%s) on %s in %s', name_or_path, type(model).__name__, device, dtype)
        return cls(model=model, processor=processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        """Caption a batch of PIL images (any size and mode); returns cleaned captions (maybe degenerate)."""
        prepared = [center_crop(im, self.size) for im in images]  # the dataset's own centre crop
        kw: dict[str, Any] = {'images': prepared, 'return_tensors': 'pt'}
        if self.prompt:
            kw['text'] = [self.prompt] * len(prepared)
        inputs = self.processor(**kw).to(self.device)
        if 'pixel_values' in inputs:
            inputs['pixel_values'] = inputs['pixel_values'].to(self.model.dtype)
        out = self.model.generate(**inputs, **self.generation.generate_kwargs())  # (B, T)
        # Decoder-only language models return the prompt ids followed by the new tokens: keep the new ones.
        if 'input_ids' in inputs and not self._is_encoder_decoder():
            n = inputs['input_ids'].shape[1]
            if out.shape[1] >= n and torch.equal(out[:, :n], inputs['input_ids']):
                out = out[:, n:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [strip_prompt(t, self.prompt) for t in texts]

    def _is_encoder_decoder(self) -> bool:
        cfg = self.model.config
        text_cfg = getattr(cfg, 'text_config', None)
        return bool(getattr(text_cfg, 'is_encoder_decoder', False) or getattr(cfg, 'is_encoder_decoder', False))
