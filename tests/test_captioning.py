"""Captioning ("telephoning"): degenerate-output filters, and ``convert/caption.py`` end to end.

No captioner checkpoint can be downloaded here, so the end-to-end test uses a tiny RANDOMLY INITIALISED
``Blip2ForConditionalGeneration`` (the real class, a small config) with a real CLIP BPE tokenizer, saved to a
temporary folder and loaded by path exactly as a user loads ``Salesforce/blip2-opt-2.7b``. Its captions are
meaningless word salad: the test checks the plumbing (loading, crop/resize, batching, generation, decoding,
filters, columns, resume, merged index), never caption quality.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion.data.captioning import Captioner, degenerate_reason, strip_prompt
from diffusion.data.dataset import center_crop

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('text,prompt,reason', [
    ('a dog running on the beach', None, None),
    ('', None, 'empty'),
    ('   dog  ', None, 'empty'),
    ('the the the the the', None, 'repeated_ngram'),
    ('a cat on a mat a cat on a mat a cat on a mat', None, 'repeated_ngram'),
    ('a photo of', 'a photo of', 'prompt_echo'),
    ('question: what is in the picture', 'Question: what is in the picture? Answer:', 'prompt_echo'),
    ('a red bicycle leaning on a wall', 'a photo of', None),
])
def test_degenerate_reason(text, prompt, reason):
    assert degenerate_reason(text, prompt) == reason


def test_strip_prompt_strips_prompt_and_spaces():
    assert strip_prompt('  A photo of   a red  bus ', 'a photo of') == 'a red bus'
    assert strip_prompt('a red bus', None) == 'a red bus'


def test_center_crop_keeps_the_middle():
    from PIL import Image
    image = Image.new('RGB', (120, 40), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 80, 40))  # blue centre square
    out = center_crop(image, 64)
    assert out.size == (64, 64)
    assert out.getpixel((32, 32)) == (0, 0, 255) and out.getpixel((2, 2))[2] > 200  # only the centre is kept


# ---------------------------------------------------------------------------------------------
# A tiny random BLIP-2 saved like a real checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_blip2(tmp_path_factory) -> Path:
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              CLIPTokenizer)

    from diffusion.models.text_encoders import clip_bpe_tokenizer_dir
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_bpe_tokenizer_dir()))
    processor = Blip2Processor(BlipImageProcessor(size={'height': 32, 'width': 32}), tokenizer, num_query_tokens=4)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=128),
        text_config=dict(model_type='opt', hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tokenizer), word_embed_proj_dim=32, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids('<image>'))
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    folder = tmp_path_factory.mktemp('tiny_blip2')
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_captioner_batches_and_prompts(tiny_blip2):
    from PIL import Image
    captioner = Captioner.from_pretrained(str(tiny_blip2), size=64)
    assert type(captioner.model).__name__ == 'Blip2ForConditionalGeneration'
    images = [Image.new('RGB', (50 + 10 * i, 40), (30 * i, 80, 200)) for i in range(3)]
    plain = captioner(images)
    assert len(plain) == 3 and all(isinstance(c, str) and c for c in plain)
    captioner.prompt = 'a photo of'
    prompted = captioner(images)
    # The prompt ids are cut from the decoder-only output: no caption starts with the prompt.
    assert len(prompted) == 3 and not any(c.lower().startswith('a photo of') for c in prompted)
    with pytest.raises(ValueError, match='float16'):
        Captioner.from_pretrained(str(tiny_blip2), device='cpu', dtype='float16')


def _run_caption(args: list[str]) -> subprocess.CompletedProcess:
    """Run the script as a user does (a fresh process, ``python convert/caption.py``)."""
    env = {**os.environ, 'PYTHONPATH': f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}
    return subprocess.run([sys.executable, str(REPO / 'convert' / 'caption.py'), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _caption_main(args: list[str]) -> int:
    """The same script's ``main`` in this process (saves a ~30 s interpreter start per call)."""
    spec = importlib.util.spec_from_file_location('caption_cli', REPO / 'convert' / 'caption.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args)


def test_caption_cli_end_to_end(tiny_blip2, demo_photos, tmp_path):
    from diffusion.data.mds_rows import RowReader, find_splits
    out = tmp_path / 'captioned'
    # Random weights write word salad; relax the repetition filter so some captions pass, and keep the
    # default filters in a second run below to see them count rejections.
    common = ['--src', str(demo_photos), '--model', str(tiny_blip2), '--size', '64', '--batch-size', '4',
              '--max-new-tokens', '8', '--num-beams', '1', '--commit-every', '4']
    proc = _run_caption(common + ['--out', str(out), '--max-ngram-repeats', '100', '--limit', '6'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'captioned' in proc.stdout

    splits = find_splits(demo_photos)
    for split in splits:
        src, dst = RowReader(demo_photos, split), RowReader(out, split)
        assert len(dst) == min(6, len(src))
        assert set(src.columns) | {'alt_text', 'caption_status'} == set(dst.columns)
        by_key = {src.row(i, ['key'])['key']: i for i in range(len(src))}
        for j in range(len(dst)):
            new = dst.row(j)
            old_raw, new_raw = src.raw(by_key[new['key']]), dst.raw(j)
            assert new_raw['image'] == old_raw['image']  # images byte for byte
            old = src.row(by_key[new['key']])
            assert new['alt_text'] == old['caption']
            assert new['sha256'] == old['sha256'] and new['license'] == old['license']
            if new['caption_status'] == 'synthetic':
                assert new['caption_source'].startswith('synthetic:') and new['caption']
            else:
                assert new['caption'] == old['caption']
    report = json.loads((out / 'report.json').read_text())
    printed = json.loads(proc.stdout[:proc.stdout.rindex('}') + 1])  # the CLI prints its report, then a line
    statuses = {status for counts in printed['caption_status'].values() for status in counts}
    assert 'synthetic' in statuses, printed
    assert report['kept'] == sum(min(6, len(RowReader(demo_photos, s))) for s in splits)

    # Resume: a second run with the same arguments has nothing left to do and changes nothing.
    index_before = (out / splits[0] / 'index.json').read_text()
    assert _caption_main(common + ['--out', str(out), '--max-ngram-repeats', '100', '--limit', '6']) == 0
    assert (out / splits[0] / 'index.json').read_text() == index_before
    # Other arguments on the same output are refused, not mixed in.
    with pytest.raises(ValueError, match='other arguments'):
        _caption_main(common + ['--out', str(out), '--limit', '6'])

    # Default filters + only weak captions: rows with good alt-text pass unchanged.
    out2 = tmp_path / 'weak_only'
    assert _caption_main(common + ['--out', str(out2), '--only-weak', '--limit', '6']) == 0
    counts = {}
    for split in splits:
        dst = RowReader(out2, split)
        for j in range(len(dst)):
            row = dst.row(j, ['caption_status', 'caption', 'alt_text'])
            counts[row['caption_status']] = counts.get(row['caption_status'], 0) + 1
            if row['caption_status'] != 'synthetic':
                assert row['caption'] == row['alt_text']
    assert counts.get('kept_not_weak', 0) > 0, counts
