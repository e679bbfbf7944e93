"""Write synthetic captions into a copy of an MDS dataset ("telephoning", CommonCanvas section 3).

    python convert/caption.py --src data/mini --out data/mini_captioned [--model Salesforce/blip2-opt-2.7b]
    composer -n 8 convert/caption.py --src ... --out ...          # one GPU per rank, index merged on rank 0

Every source column is kept (images byte for byte). ``caption`` gets the synthetic caption, ``alt_text`` the
original text, ``caption_source`` becomes ``synthetic:<model>`` and ``caption_status`` says what happened:
``synthetic``, ``kept_not_weak`` (with ``--only-weak``), ``rejected_empty`` / ``rejected_repeated_ngram`` /
``rejected_prompt_echo`` (a degenerate output: the original caption is kept) or ``image_unreadable``.
An interrupted run resumes where it stopped when re-run with the same arguments.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from diffusion.data.captioning import DEFAULT_GENERATION, DEFAULT_MODEL, Captioner, GenerationSettings, degenerate_reason
from diffusion.data.convert_args import add_map_args, resolve_device

log = logging.getLogger('caption')

NEW_COLUMNS = {'caption': 'str', 'alt_text': 'str', 'caption_source': 'str', 'caption_status': 'str'}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    g = DEFAULT_GENERATION
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter,
                                allow_abbrev=False)  # --commit must not pass for --commit-every
    add_map_args(p, batch_size=8, commit_every=64)
    p.add_argument('--model', default=DEFAULT_MODEL, help=f'HF image-to-text model name or folder ({DEFAULT_MODEL})')
    p.add_argument('--prompt', default=None, help='text prefix given with each image (default: none)')
    p.add_argument('--size', type=int, default=512, help='centre-crop and resize to this square first (512)')
    p.add_argument('--max-new-tokens', type=int, default=g.max_new_tokens)
    p.add_argument('--min-new-tokens', type=int, default=g.min_new_tokens)
    p.add_argument('--num-beams', type=int, default=g.num_beams)
    p.add_argument('--sample', action='store_true', help='sample instead of beam search')
    p.add_argument('--temperature', type=float, default=g.temperature, help='with --sample')
    p.add_argument('--top-p', type=float, default=g.top_p, help='with --sample')
    p.add_argument('--repetition-penalty', type=float, default=g.repetition_penalty)
    p.add_argument('--no-repeat-ngram-size', type=int, default=g.no_repeat_ngram_size)
    p.add_argument('--min-words', type=int, default=2, help='fewer words is a degenerate "empty" caption')
    p.add_argument('--max-ngram-repeats', type=int, default=2,
                   help='a word pair occurring more often is degenerate "repeated_ngram"')
    p.add_argument('--only-weak', action='store_true', help='caption only rows whose caption_weak is set')
    p.add_argument('--dtype', default=None, choices=['float32', 'float16', 'bfloat16'],
                   help='default: float16 on GPU, float32 on CPU')
    return p.parse_args(argv)


def _model_tag(model: str) -> str:
    return Path(model).name if Path(model).exists() else model


class CaptionRows:
    """The row function for :func:`diffusion.data.mds_rows.map_dataset`: caption a batch of rows."""

    def __init__(self, captioner: Captioner, args: argparse.Namespace) -> None:
        self.captioner = captioner
        self.args = args
        self.source_tag = f'synthetic:{_model_tag(args.model)}'

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(rows)
        todo, images = [], []
        for i, row in enumerate(rows):
            original = str(row.get('caption', '') or '')
            keep = {'caption': original, 'alt_text': str(row.get('alt_text', original) or original),
                    'caption_source': str(row.get('caption_source', '') or '')}
            if self.args.only_weak and not int(row.get('caption_weak', 0) or 0):
                results[i] = {**keep, 'caption_status': 'kept_not_weak'}
                continue
            try:
                image = Image.open(io.BytesIO(row['image']))
                image.load()
            except (UnidentifiedImageError, OSError, ValueError) as err:
                log.warning('row %s: unreadable image (%s); original caption kept', row.get('key'), err)
                results[i] = {**keep, 'caption_status': 'image_unreadable'}
                continue
            results[i] = keep
            todo.append(i)
            images.append(image)
        captions = self.captioner(images) if images else []
        for i, text in zip(todo, captions):
            reason = degenerate_reason(text, self.args.prompt, min_words=self.args.min_words,
                                       max_ngram_repeats=self.args.max_ngram_repeats)
            if reason is None:
                results[i] = {**results[i], 'caption': text, 'caption_source': self.source_tag,
                              'caption_status': 'synthetic'}
            else:
                log.debug('row %s: degenerate caption (%s): %r', rows[i].get('key'), reason, text)
                results[i] = {**results[i], 'caption_status': f'rejected_{reason}'}
        return results  # type: ignore[return-value]


def count_status(out: Path, splits: list[str]) -> dict[str, dict[str, int]]:
    """``caption_status`` counts per split, read back from the written dataset (so resumed runs count too)."""
    from diffusion.data.mds_rows import RowReader
    counts = {}
    for split in splits:
        reader = RowReader(out, split)
        counts[split or 'all'] = dict(Counter(reader.row(i, ['caption_status'])['caption_status']
                                              for i in range(len(reader))))
    return counts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    args = parse_args(argv)
    from diffusion.data.mds_rows import find_splits, map_dataset
    splits = args.splits if args.splits else find_splits(args.src)
    generation = GenerationSettings(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                    num_beams=args.num_beams, do_sample=args.sample, temperature=args.temperature,
                                    top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                    no_repeat_ngram_size=args.no_repeat_ngram_size)
    captioner = Captioner.from_pretrained(args.model, device=resolve_device(args.device), dtype=args.dtype,
                                          prompt=args.prompt, size=args.size, generation=generation)
    config = {k: v for k, v in vars(args).items() if k not in ('out', 'device', 'batch_size', 'splits')}
    report = map_dataset(args.src, args.out, CaptionRows(captioner, args), NEW_COLUMNS, config=config,
                         batch_size=args.batch_size, commit_every=args.commit_every, splits=splits,
                         desc='caption', limit=args.limit)
    if report:  # rank 0
        report['caption_status'] = count_status(Path(args.out), splits)
        print(json.dumps(report, indent=1, sort_keys=True))
        total = Counter()
        for c in report['caption_status'].values():
            total.update(c)
        print(f'captioned {total["synthetic"]} of {report["kept"]} rows with {args.model} into {args.out}; '
              f'degenerate (original kept): {sum(v for k, v in total.items() if k.startswith("rejected_"))}; '
              f'not weak (unchanged): {total["kept_not_weak"]}; unreadable images: {total["image_unreadable"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
