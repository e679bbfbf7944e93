"""The demo's report: labelled sample grids, loss curves, metrics per model, timings, licences.

Inputs are the files the demo's stages leave behind (training ``summary.json``, ``eval/metrics.json`` of
:mod:`diffusion.demo.evaluate`, generated images with their ``manifest.jsonl``, the catalog's
``report.json`` and ``attribution.csv``); outputs are ``report.md``, its HTML twin ``report.html`` (opens in
a browser, images beside it), ``metrics.json`` (one object per model) and PNG figures. Also here: the model
card (``README.md``) of an exported pipeline folder, which states the training data's licences and points to
the attribution file, as CC BY requires.
"""
from __future__ import annotations

import collections
import csv
import html
import json
import os
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ['labelled_grid', 'loss_plot', 'model_metrics', 'licence_counts', 'write_report', 'write_model_card']

METRIC_KEYS = ('probe_accuracy_generated', 'probe_accuracy_real', 'chance', 'fid_first', 'fid_last', 'n_reference')


def labelled_grid(prompts: Sequence[str], rows: Sequence[tuple[str, Sequence[Image.Image]]], path: Path,
                  cell: int = 96) -> Path:
    """A grid: one column per prompt (wrapped under the column), one row per image set (label on the left)."""
    font = ImageFont.load_default()
    label_w, text_h = 110, 40
    width = label_w + len(prompts) * (cell + 4)
    height = len(rows) * (cell + 4) + text_h
    sheet = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        y = r * (cell + 4) + 2
        for i, line in enumerate(textwrap.wrap(label, 16)[:4]):
            draw.text((4, y + cell // 2 - 16 + 11 * i), line, fill='black', font=font)
        for c, im in enumerate(images[:len(prompts)]):
            sheet.paste(im.convert('RGB').resize((cell, cell), Image.NEAREST), (label_w + c * (cell + 4), y))
    y0 = len(rows) * (cell + 4) + 2
    for c, prompt in enumerate(prompts):
        for i, line in enumerate(textwrap.wrap(prompt, cell // 6)[:3]):
            draw.text((label_w + c * (cell + 4), y0 + 11 * i), line, fill='black', font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _smooth(values: Sequence[float], window: int = 25) -> list[float]:
    out, acc = [], collections.deque(maxlen=window)
    for v in values:
        acc.append(v)
        out.append(sum(acc) / len(acc))
    return out


def loss_plot(summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    """Training loss (running mean) and validation loss against batches, one colour per model."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for i, (name, summary) in enumerate(summaries.items()):
        history, colour = summary.get('history', {}), f'C{i}'
        train = history.get('loss/train/total', [])
        if train:
            axes[0].plot([p[0] for p in train], _smooth([p[1] for p in train]), color=colour, label=name)
        val = next((v for k, v in history.items() if k.endswith('ValidationLoss')), [])
        if val:
            axes[1].plot([p[0] for p in val], [p[1] for p in val], 'o-', color=colour, label=name)
    axes[0].set_title('training loss (running mean of 25)')
    axes[1].set_title('validation loss (fixed noise, held-out)')
    for ax in axes:
        ax.set_xlabel('batch')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def model_metrics(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The ``metrics.json`` object of one model from its ``eval/metrics.json``."""
    first, last = evaluation['checkpoints']['first'], evaluation['checkpoints']['last']
    return {'probe_accuracy_generated': last['probe_accuracy'],
            'probe_accuracy_real': evaluation['probe_accuracy_real'],
            'chance': evaluation['chance'], 'fid_first': first['fid'], 'fid_last': last['fid'],
            'n_reference': evaluation['n_reference'], 'kid_first': first['kid_mean'], 'kid_last': last['kid_mean'],
            'probe_accuracy_generated_first': first['probe_accuracy'], 'batch_first': first['batch'],
            'batch_last': last['batch'], 'probe_classes': len(evaluation['probe_classes']),
            **({'probe_ae_accuracy_generated': last['probe_ae_accuracy'],
                'probe_ae_accuracy_generated_first': first['probe_ae_accuracy'],
                'probe_ae_accuracy_real': evaluation['probe_ae_accuracy_real']} if 'probe_ae_accuracy' in last else {}),
            **({'probe_accuracy_reconstructed': evaluation['reconstructed']['probe_accuracy'],
                'fid_reconstructed': evaluation['reconstructed']['fid'],
                'kid_reconstructed': evaluation['reconstructed']['kid_mean']} if 'reconstructed' in evaluation else {})}


def licence_counts(attribution: Path) -> dict[str, int]:
    """Images per licence in an ``attribution.csv``."""
    with open(attribution, encoding='utf-8') as f:
        return dict(collections.Counter(row['license'] for row in csv.DictReader(f)).most_common())


def _read_manifest_images(folder: Path, limit: int) -> tuple[list[str], list[Image.Image]]:
    entries = sorted((json.loads(x) for x in (folder / 'manifest.jsonl').read_text().splitlines() if x.strip()),
                     key=lambda e: e['index'])[:limit]
    return [e['prompt'] for e in entries], [Image.open(folder / e['file']).convert('RGB') for e in entries]


def model_grid(name: str, evaluation: dict[str, Any], real: Sequence[Image.Image], path: Path,
               columns: Sequence[int]) -> Path:
    """Real held-out images above the first and the last checkpoint's images for the same captions."""
    rows, prompts = [('real (held out)', [real[i] for i in columns])], []
    for tag in ('first', 'last'):
        ckpt = evaluation['checkpoints'][tag]
        all_prompts, images = _read_manifest_images(Path(ckpt['images']), max(columns) + 1)
        prompts = [all_prompts[i] for i in columns]
        rows.append((f'{name} batch {ckpt["batch"]}', [images[i] for i in columns]))
    return labelled_grid(prompts, rows, path)


def _metrics_table(metrics: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per model; the autoencoder-ceiling columns only when some model was scored with them."""
    ceiling = any('probe_accuracy_reconstructed' in m for m in metrics.values())
    probe_ae = any('probe_ae_accuracy_generated' in m for m in metrics.values())
    head = ['model', 'probe bal. acc. generated (first -> last)', 'probe bal. acc. real', 'chance',
            'FID first -> last', 'KID first -> last']
    head += ['autoencoder ceiling: probe / FID / KID'] if ceiling else []
    head += ['probe fitted on reconstructions: generated (first -> last) / real'] if probe_ae else []
    rows = [head + ['held-out images']]
    for name, m in metrics.items():
        row = [name, f'{m["probe_accuracy_generated_first"]:.3f} -> {m["probe_accuracy_generated"]:.3f} '
                     f'({m["probe_accuracy_generated"] / m["chance"]:.1f}x chance)',
               f'{m["probe_accuracy_real"]:.3f}', f'{m["chance"]:.3f} (1/{m["probe_classes"]})',
               f'{m["fid_first"]:.1f} (ba {m["batch_first"]}) -> {m["fid_last"]:.1f} (ba {m["batch_last"]})',
               f'{m["kid_first"]:.4f} -> {m["kid_last"]:.4f}']
        if ceiling:
            row.append(f'{m["probe_accuracy_reconstructed"]:.3f} / {m["fid_reconstructed"]:.1f} / '
                       f'{m["kid_reconstructed"]:.4f}' if 'probe_accuracy_reconstructed' in m else 'n/a')
        if probe_ae:
            row.append(f'{m["probe_ae_accuracy_generated_first"]:.3f} -> {m["probe_ae_accuracy_generated"]:.3f} '
                       f'({m["probe_ae_accuracy_generated"] / m["chance"]:.1f}x chance) / '
                       f'{m["probe_ae_accuracy_real"]:.3f}' if 'probe_ae_accuracy_generated' in m else 'n/a')
        rows.append(row + [str(m['n_reference'])])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    lines = ['| ' + ' | '.join(rows[0]) + ' |', '|' + ' --- |' * len(rows[0])]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows[1:]])


def _html_table(rows: list[list[str]]) -> str:
    head = ''.join(f'<th>{html.escape(c)}</th>' for c in rows[0])
    body = ''.join('<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in r) + '</tr>' for r in rows[1:])
    return f'<table><tr>{head}</tr>{body}</table>'


def write_report(root: Path, sections: list[tuple[str, list[Any]]], metrics: dict[str, dict[str, Any]]) -> Path:
    """``root/report.md``, ``root/report.html`` and ``root/metrics.json`` from ``(title, blocks)`` sections.

    A block is a paragraph string, ``('image', relative_path, caption)`` or ``('table', rows)``.
    """
    md, body = ['# CommonCanvas demo report'], []
    for title, blocks in sections:
        md.append(f'\n## {title}\n')
        body.append(f'<h2>{html.escape(title)}</h2>')
        for block in blocks:
            if isinstance(block, str):
                md.append(block + '\n')
                body.append(f'<p>{html.escape(block)}</p>')
            elif block[0] == 'image':
                md.append(f'![{block[2]}]({block[1]})\n')
                body.append(f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">'
                            f'<figcaption>{html.escape(block[2])}</figcaption></figure>')
            else:
                md.append(_md_table(block[1]) + '\n')
                body.append(_html_table(block[1]))
    _write(root / 'report.md', '\n'.join(md) + '\n')
    style = ('body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}'
             'table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}')
    _write(root / 'report.html', f'<!doctype html><html><head><meta charset="utf-8"><title>CommonCanvas demo'
                                 f'</title><style>{style}</style></head><body><h1>CommonCanvas demo report</h1>'
                                 + ''.join(body) + '</body></html>\n')
    _write(root / 'metrics.json', json.dumps(metrics, indent=1) + '\n')
    return root / 'report.md'


def metrics_section(metrics: dict[str, dict[str, Any]]) -> list[Any]:
    """The report's metrics blocks (a table and how to read it)."""
    text = ('Probe: logistic regression on Inception pool features of real training images, predicting the '
            "emoji's category; balanced accuracy = mean per-class recall, chance = 1/K. 'generated' scores the "
            "images made from held-out captions (the category of the caption's image is the label); 'real' "
            'scores the held-out images themselves (the ceiling). ')
    if any('probe_accuracy_reconstructed' in m for m in metrics.values()):
        text += ('Autoencoder ceiling: the held-out images passed through the model\'s own autoencoder '
                 '(decode(encode(x))), scored like generated images: what a diffusion model that reproduced the '
                 "data's latents exactly would reach with this autoencoder. Probe fitted on reconstructions: the "
                 'same logistic regression fitted on the same training images passed through the autoencoder, so it '
                 'judges generated images (always decoder outputs) in the decoder\'s blurred domain instead of '
                 'penalising the blur; a diagnostic beside the first probe, not a replacement. ')
    text += ('FID/KID: the same held-out images as reference, one generated image per held-out caption; FID on a '
             'few hundred images is biased upward: compare first with last.')
    return [('table', _metrics_table(metrics)), text]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


def write_model_card(folder: Path, attribution: Path, licences: dict[str, int], summary: Optional[str] = None) -> Path:
    """``folder/README.md``: what the model is, the licences of its training data, where the attribution is."""
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / 'attribution.csv'
    if attribution.exists():
        local.write_bytes(attribution.read_bytes())  # travels with the weights
    lines = ['# CommonCanvas demo model', '',
             summary or 'A tiny text-to-image latent diffusion model trained from scratch on a CPU by `make demo`.',
             '', '## Training data and licences', '',
             'Trained only on openly licensed images; images per licence in the dataset (train and held-out '
             'splits):', '']
    lines += [f'- {name}: {count}' for name, count in licences.items()]
    lines += ['', 'The creators of the images and the licence of each image are listed in `attribution.csv` '
              '(beside this file; a copy of the dataset\'s own attribution file). CC BY and CC BY-SA require '
              'this attribution to be kept with the model and anything made from the data.', '']
    _write(folder / 'README.md', '\n'.join(lines))
    return folder / 'README.md'


# ---------------------------------------------------------------------------------------------
# The demo's report from its output folder
# ---------------------------------------------------------------------------------------------
def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def _model_section(name: str, root: Path, evaluation: dict[str, Any], real: dict[str, Image.Image]) -> list[Any]:
    n = len(evaluation['reference_keys'])
    columns = sorted({round(i * (n - 1) / 11) for i in range(12)})  # an even spread over the held-out captions
    by_key = [real[k] for k in evaluation['reference_keys']]
    grid = model_grid(name, evaluation, by_key, root / 'figures' / f'{name}-grid.png', columns)
    first, last = evaluation['checkpoints']['first'], evaluation['checkpoints']['last']
    blocks: list[Any] = [
        ('image', _rel(grid, root), f'{name}: real held-out images (top) and the model\'s images for the same '
                                    f'captions at batch {first["batch"]} and batch {last["batch"]}'),
        f'Settings: {evaluation["settings"]}; {evaluation["n_reference"]} held-out captions, one image each; the '
        f'probe knows {len(evaluation["probe_classes"])} categories: {", ".join(evaluation["probe_classes"])}.']
    if evaluation.get('sweep_plot'):
        plot = Path(evaluation['sweep_plot'])
        target = root / 'figures' / f'{name}-guidance.png'
        target.write_bytes(plot.read_bytes())
        rows = [['guidance', 'FID', 'KID', 'probe bal. acc.', 'images']]
        rows += [[f'{r["guidance_scale"]:g}', f'{r["fid"]:.1f}', f'{r["kid_mean"]:.4f}',
                  f'{r.get("probe_accuracy", float("nan")):.3f}', str(r['num_generated'])]
                 for r in evaluation['sweep']]
        blocks += [('image', _rel(target, root), f'{name}: guidance sweep at the last checkpoint'), ('table', rows)]
    return blocks


def build_report(root: Path, catalog: Path, models: Sequence[str], timings: dict[str, float], variant: str) -> Path:
    """Assemble the demo's report from ``root`` (see the module docstring); returns ``report.md``'s path."""
    from diffusion.demo.probe import load_labeled
    (root / 'figures').mkdir(parents=True, exist_ok=True)
    evaluations = {m: json.loads((root / m / 'eval' / 'metrics.json').read_text()) for m in models}
    summaries = {m: json.loads((root / m / 'checkpoints' / 'summary.json').read_text()) for m in models}
    metrics = {m: model_metrics(e) for m, e in evaluations.items()}
    held = load_labeled(catalog, 'eval')
    real = dict(zip(held['keys'], held['images']))
    catalog_report = json.loads((catalog / 'report.json').read_text())
    attribution = catalog / 'attribution.csv'
    curves = loss_plot(summaries, root / 'figures' / 'loss.png')
    sections: list[tuple[str, list[Any]]] = [
        ('Metrics', metrics_section(metrics)),
        ('Training', [('image', _rel(curves, root), 'training and validation loss'),
                      ('table', [['model', 'batches', 'images seen', 'seconds']] + [
                          [m, str(s['batches']), str(s['samples']), f'{s["seconds"]:.0f}']
                          for m, s in summaries.items()])])]
    sections += [(f'Samples: {m}', _model_section(m, root, evaluations[m], real)) for m in models]
    sections.append(('Timings', [f'Variant: {variant}. Seconds per stage (0 = done by an earlier run, skipped):',
                                 ('table', [['stage', 'seconds']] + [[k, f'{v:.0f}'] for k, v in timings.items()])]))
    licences = licence_counts(attribution)
    sections.append(('Data and licences', [
        f'Catalog {catalog}: {catalog_report.get("kept")} images, splits {catalog_report.get("splits")}; licences '
        f'{licences}. Creators and licence of every image: {attribution} (copied into the exported model '
        'folder with its model card).']))
    return write_report(root, sections, metrics)
