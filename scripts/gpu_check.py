"""Every full-scale recipe, at reduced width, for ~20 steps on one CUDA GPU with the recipe's real GPU paths.

    make gpu-check                                  # or: python3 scripts/gpu_check.py
    python3 scripts/gpu_check.py --wheels .whl      # install the carried wheels first (no internet, torch kept)
    python3 scripts/gpu_check.py --device cpu       # the same shrinking and 2 fp32 steps on CPU (a test runs it)

Each recipe of :data:`FULL_RECIPES` is built as written (optimizer, scheduler, algorithms, callbacks, precision,
``fsdp_config``, checkpoint format) and only its sizes shrink (:func:`shrink`): the backbone's width, a random
tiny VAE (4x downsampling) and CLIP text encoder in place of the pretrained ones, precomputed latents of the
project's demo photos, batch 32 (CPU: 2), short durations. On CUDA composer then runs its GPU paths: bf16 autocast
(``amp_bf16``), FSDP over one process (world size 1, NCCL), SDPA attention (flash kernels on bf16 inputs) and
``compile_backbone`` where the recipe lists it. Printed per recipe: median step time, peak memory, MFU against the
GPU's peak dense bf16 FLOP/s (FLOPs of one training step counted with ``torch.utils.flop_counter``) and the last
loss. A table, then one JSON line. Exit status 1 when any recipe fails or ends with a non-finite loss; 2 (one line)
when no CUDA GPU is visible and ``--device cpu`` was not given.

Packages. The GPU machines this targets have a recent torch, numpy, transformers, safetensors... but no composer,
streaming or diffusers. :data:`CARRIED` pins (from requirements/lock.txt) what the training imports need beyond
the machine's own packages. With internet, ``--download-wheels DIR`` fetches them (``pip download --no-deps``);
without, carry that folder along and pass ``--wheels DIR``: they are installed with ``pip --no-deps --target`` into
a separate folder put first on ``sys.path`` (the script re-executes itself), so torch is never touched.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository's packages import without an install
    sys.path.insert(0, str(REPO))

# The full-scale training recipes (yamls/); the small CPU recipes and demos are not among them.
FULL_RECIPES = (
    'sd2-base-cc.yaml',
    'commoncanvas/s-c-256.yaml', 'commoncanvas/s-nc-256.yaml', 'commoncanvas/s-c-512.yaml',
    'commoncanvas/s-nc-512.yaml', 'commoncanvas/l-c-256.yaml', 'commoncanvas/l-nc-256.yaml',
    'commoncanvas/autoencoder.yaml',
    'microdit/256-masked.yaml', 'microdit/256-unmasked.yaml', 'microdit/512-masked.yaml',
    'microdit/512-unmasked.yaml',
)
# Backbone widths per mode: 'tiny' (CPU tests: the presets that train on a CPU) and 'gpu' (reduced width: a
# quarter of the parameters of the UNets, MicroDiT's Tiny-2 preset, the autoencoder at half its channels).
WIDTHS = {
    # tiny: sdxl-base is mini-l's SDXL structure at half its widths (its head width of 32 kept)
    'tiny': {'sd2-base': {'preset': 'mini-s'},
             'sdxl-base': {'preset': 'mini-l', 'block_out_channels': [32, 64, 96], 'attention_head_dim': [1, 2, 3]},
             'microdit-xl-2': {'preset': 'microdit-mini'}, 'microdit-tiny-2': {'preset': 'microdit-mini'}},
    'gpu': {'sd2-base': {'block_out_channels': [160, 320, 640, 640]},
            'sdxl-base': {'block_out_channels': [160, 320, 640]},
            'microdit-xl-2': {'preset': 'microdit-tiny-2'}},
}
TINY_TEXT = {'clip': {'name': 'tiny_clip'}, 'sdxl_clip_pair': {'name': 'tiny_clip', 'pair': True}}
VAE_DOWNSAMPLE = 4  # the tiny VAE; the recipes' VAEs downsample 8x
# Peak dense bf16 tensor FLOP/s (vendor datasheets, without sparsity), matched against the device name.
PEAK_BF16 = (('H200', 989.4e12), ('H100 PCIe', 756.0e12), ('H100', 989.4e12), ('A100', 312.0e12),
             ('L40S', 362.0e12), ('L4', 121.0e12), ('A10G', 70.0e12), ('RTX 4090', 165.2e12))
# What the training imports need beyond a GPU machine's own packages, at requirements/lock.txt's versions: every
# distribution of a module loaded by a CPU rehearsal (``--device cpu``, sys.modules mapped through
# importlib.metadata.packages_distributions()), less those the GPU image ships (devices' KINDS.md list: torch,
# numpy, scipy, pandas, pyarrow, pillow, PyYAML, requests, ...). transformers, tokenizers, huggingface-hub,
# accelerate and torchmetrics are carried although the image has them: its versions (transformers 5) are newer
# than what diffusers 0.34 / composer 0.32 were written against. open_clip_torch ships the CLIP BPE vocabulary.
# Never carried: torch, torchvision, triton, xformers, numpy (nor setuptools' vendored packages).
CARRIED = (
    'GitPython==3.1.44', 'PyNaCl==1.6.2', 'accelerate==1.8.1', 'annotated-types==0.8.0',
    'antlr4-python3-runtime==4.9.3', 'backoff==2.2.1', 'bcrypt==5.0.0',
    'beautifulsoup4==4.15.0', 'boto3==1.44.5', 'botocore==1.44.5', 'brotli==1.2.1', 'cachetools==5.5.2',
    'catalogue==2.0.10', 'cffi==2.1.1', 'coolname==2.2.0', 'cramjam==2.14.0', 'cryptography==50.0.2',
    'databricks-sdk==0.156.0', 'datasets==3.6.0', 'defusedxml==0.7.1', 'diffusers==0.34.0', 'dill==0.3.8',
    'gitdb==4.0.12', 'google-api-core==2.33.0', 'google-auth==2.62.2', 'google-cloud-core==2.8.0',
    'google-cloud-storage==2.10.0', 'google-resumable-media==2.11.0', 'googleapis-common-protos==1.75.0',
    'gql==3.5.3', 'graphql-core==3.2.6', 'huggingface-hub==0.33.5', 'importlib_metadata==8.9.0',
    'jmespath==1.1.0',
    'llm-foundry==0.22.0', 'mlflow==2.22.5', 'mlflow-skinny==2.22.5', 'mosaicml==0.32.1',
    'mosaicml-cli==0.7.5', 'mosaicml-streaming==0.12.0', 'multiprocess==0.70.16', 'omegaconf==2.3.1',
    'open_clip_torch==3.3.0', 'opentelemetry-api==1.45.2', 'opentelemetry-sdk==1.45.2',
    'opentelemetry-semantic-conventions==0.66b2', 'paramiko==3.5.1', 'platformdirs==4.14.7',
    'prompt_toolkit==3.0.53', 'pyOpenSSL==26.4.0', 'pydantic==2.14.3', 'pydantic_core==2.50.4', 'pynvml==11.5.3',
    'python-snappy==0.7.3', 'pytz==2026.6', 'questionary==1.10.0', 'ruamel.yaml==0.19.1', 's3transfer==0.19.3',
    'smmap==5.0.3', 'soupsieve==2.10', 'sqlparse==0.6.1', 'tenacity==9.2.1', 'tokenizers==0.21.4',
    'torchmetrics==1.7.4', 'transformers==4.51.3', 'typing-inspection==0.4.5', 'validators==0.36.0',
    'wcwidth==0.9.4', 'websockets==11.0.3', 'zstd==1.5.7.2',
)


def recipe_res(raw: dict[str, Any]) -> int:
    return int(raw.get('variables', {}).get('resolution') or raw['train_loader'].get('resolution') or 256)


def tiny_res(full_res: int, mode: str) -> int:
    """Image side of the shrunk run: 32 px on CPU; on the GPU the side whose 4x latents match the recipe's 8x."""
    return 32 if mode == 'tiny' else full_res * VAE_DOWNSAMPLE // 8


def _shrink_model(model: dict[str, Any], assets: dict[str, Any], mode: str, res: int) -> None:
    if model.get('name') == 'autoencoder_kl_training':
        cfg = model['config']
        scale = 4 if mode == 'tiny' else 2
        cfg.update(block_out_channels=[max(16, c // scale) if mode == 'gpu' else min(32 * (i + 1), 64)
                                       for i, c in enumerate(cfg['block_out_channels'])])
        if mode == 'tiny':
            cfg.update(layers_per_block=1, norm_num_groups=16)
            model['discriminator'] = {'channels': 16, 'num_layers': 2}
        return
    if model.get('autoencoder', {}).get('pretrained'):
        model['autoencoder'] = {'name': 'autoencoder_kl', 'pretrained': str(assets['vae'])}
    text = model.get('text_encoder') or {}
    if text.get('name') in TINY_TEXT:
        model['text_encoder'] = dict(TINY_TEXT[text['name']])
    backbone = model['backbone']
    if backbone.get('attention') == 'xformers' and mode == 'tiny':  # CUDA only
        backbone['attention'] = 'sdpa'
    backbone.update(WIDTHS[mode].get(backbone.get('preset'), {}))
    if 'sample_size' in backbone:  # the latent side the position table is built for, as in the full recipe
        backbone['sample_size'] = res // VAE_DOWNSAMPLE


def _short_times(raw: dict[str, Any], start: int, steps: int) -> None:
    """Durations shrink with the run: warm-up to one batch, EMA and the GAN terms to start after its first batch."""
    sched = raw.get('scheduler') or {}
    if str(sched.get('t_warmup', '0ba')) not in ('0ba', '0'):
        sched['t_warmup'] = '1ba'
    ema = (raw.get('algorithms') or {}).get('ema')
    if ema and ema.get('ema_start'):
        ema['ema_start'] = f'{start + 1}ba'
    if raw['model'].get('disc_start'):  # the autoencoder's adversarial terms switch on inside the run
        raw['model']['disc_start'] = 1
    raw['max_duration'] = f'{start + steps}ba'
    for key in ('save_interval', 'eval_interval'):
        if raw.get(key):
            raw[key] = f'{steps}ba'


def shrink(name: str, assets: dict[str, Any], out: Path, *, mode: str = 'tiny', steps: int = 3, batch: int = 2,
           start: int = 0, load_path: Optional[str] = None) -> dict[str, Any]:
    """The recipe ``yamls/<name>`` as written, validated, with only its sizes shrunk (an unresolved raw config).

    Kept as written: optimizer, scheduler, algorithms, callbacks, precision, ``fsdp_config`` (checkpoint format
    included), autoresume. Changed: widths (:data:`WIDTHS`), frozen encoders (tiny, random), data (the precomputed
    demo photos in ``assets``), resolution, batch sizes, durations (``start``: the batch a loaded full state resumes
    at), sample grids (2 sampler steps), output folders (under ``out``), ``load_path`` (a shrunk earlier stage's
    checkpoint, or none).
    """
    from omegaconf import OmegaConf

    from diffusion.builders import fsdp_config
    from diffusion.config import load_config, load_yaml
    full = load_config(REPO / 'yamls' / name)  # the recipe validates as written
    fsdp_config(full)
    raw = OmegaConf.to_container(load_yaml(REPO / 'yamls' / name), resolve=False)
    res = recipe_res(raw)
    if mode == 'tiny' or raw['train_loader'].get('use_latents') not in (None, False):
        res = tiny_res(res, mode)  # pixel recipes (the autoencoder) keep their resolution on the GPU
    raw.setdefault('variables', {}).update(run_name=Path(name).stem, resolution=res)
    _shrink_model(raw['model'], assets, mode, res)
    data = assets['photos']
    if raw['train_loader'].get('use_latents') not in (None, False):
        data = assets['latents'](raw['model'].get('text_encoder') or {'name': 'minilm'}, res)
        if 'empty_caption_path' in raw['model']:
            raw['model']['empty_caption_path'] = str(data / 'empty_caption.safetensors')
    for key in ('train_loader', 'eval_loader'):
        if raw.get(key):
            raw[key].update(remote=None, local=str(data), resolution=res, num_workers=0, persistent_workers=False,
                            prefetch_factor=None)
    micro = raw.get('device_train_microbatch_size')
    raw.update(global_train_batch_size=batch, device_eval_batch_size=batch, eval_subset_num_batches=1,
               device_train_microbatch_size=min(micro, batch) if isinstance(micro, int) else micro,
               save_folder=str(out / 'checkpoints'), load_path=load_path, console_log_interval='1ba',
               progress_bar=False)
    _short_times(raw, start, steps)
    compile_block = (raw.get('algorithms') or {}).get('compile_backbone')
    if mode == 'tiny' and compile_block is not None:
        # Graph capture and AOT autograd as on the GPU (a graph break still fails under fullgraph), without
        # inductor's C++ code generation, which took ~70 s per tiny MicroDiT on 2 CPU cores.
        compile_block['backend'] = 'aot_eager'
    for label, block in (raw.get('callbacks') or {}).items():
        if label == 'sample_images':
            block.update(folder=str(out / 'samples'), num_inference_steps=2, height=res, width=res)
        elif isinstance(block, dict) and 'folder' in block:
            block['folder'] = str(out / label)
        if label == 'speed_monitor':
            block['window_size'] = 1
    return raw


def make_assets(folder: Path, device: str = 'cpu', photos: Optional[Path] = None) -> dict[str, Any]:
    """Tiny random VAE, the demo photos (MDS) and, on demand, their precomputed latents per text encoder."""
    import importlib.util

    import torch
    from diffusers import AutoencoderKL

    from diffusion.demo.photos import build_demo_photos
    from diffusion.models.autoencoders import TINY_VAE_CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vae = folder / 'tiny_vae'
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(vae)
    photos = photos or Path(build_demo_photos(folder / 'demo_photos'))
    spec = importlib.util.spec_from_file_location('precompute_cli', REPO / 'convert' / 'precompute_latents.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    made: dict[str, Path] = {}

    def latents(text_encoder: dict[str, Any], res: int) -> Path:
        key = json.dumps([text_encoder, res], sort_keys=True)
        if key not in made:
            out = folder / f'latents{len(made)}'
            extra = {k: v for k, v in text_encoder.items() if k != 'name'}
            args = ['--src', str(photos), '--out', str(out), '--vae', str(vae), '--resolutions', str(res),
                    '--text-encoder', text_encoder['name'], '--text-encoder-kwargs', json.dumps(extra),
                    '--batch-size', '8', '--device', device]
            if cli.main(args) != 0:
                raise RuntimeError(f'precomputing latents failed: {args}')
            made[key] = out
        return made[key]
    return {'vae': vae, 'photos': photos, 'latents': latents}


def stage_parent(name: str) -> Optional[str]:
    """The recipe whose checkpoint ``name`` loads (``load_path: outputs/<its run_name>/...``), if any."""
    from diffusion.config import load_config
    load = load_config(REPO / 'yamls' / name).load_path
    if not load:
        return None
    for other in FULL_RECIPES:
        path = REPO / 'yamls' / other
        if other != name and path.exists() and f'/{load_config(path).run_name}/' in f'/{load}':
            return other
    return None


def peak_flops(device_name: str) -> Optional[float]:
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


def step_flops(model: Any, batch: dict[str, Any], precision_ctx: Any) -> int:
    """FLOPs of one training step (forward, loss, backward) on ``batch``; gradients are cleared afterwards.

    Counted eagerly (``force_eager``): a compiled backbone is neither compiled for the counter nor hidden from it.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.compiler.set_stance('force_eager'):
        with counter, precision_ctx:
            outputs = model(batch)
            loss = model.loss(outputs, batch)
            loss = loss['total'] if isinstance(loss, dict) else loss
        with counter:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def run_one(name: str, assets: dict[str, Any], out: Path, device: str, steps: int, batch: int,
            parents: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """Shrink, build with ``diffusion.training.train.build_trainer``, count FLOPs, fit, measure."""
    import torch
    from composer.core import Callback, get_precision_context

    from diffusion.config import load_config
    from diffusion.training.train import build_trainer
    parent = stage_parent(name)
    load_path, start = parents.get(parent, (None, 0)) if parent else (None, 0)
    raw = shrink(name, assets, out, mode='gpu' if device == 'gpu' else 'tiny', steps=steps, batch=batch,
                 start=0 if raw_weights_only(name) else start, load_path=load_path)
    if device == 'cpu':
        raw.update(precision='fp32', fsdp_config=None)  # composer trains on CPU in fp32 only, without FSDP
    raw['device'] = device
    cfg = load_config(base=raw)
    trainer = build_trainer(cfg)
    model = trainer.state.model
    batch0 = trainer.state.device.batch_to_device(next(iter(trainer.state.train_dataloader)))
    flops = step_flops(model, batch0, get_precision_context(trainer.state.precision))

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def batch_start(self, state: Any, logger: Any) -> None:
            if device == 'gpu':
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def batch_end(self, state: Any, logger: Any) -> None:
            if device == 'gpu':
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
    timer = Timer()
    trainer.state.callbacks.append(timer)
    if device == 'gpu':
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    loss = trainer.state.loss
    loss = loss['total'] if isinstance(loss, dict) else loss
    loss = float(loss.detach().float().mean())
    steady = timer.times[len(timer.times) // 4:] or timer.times  # the first steps compile and warm up
    step_s = statistics.median(steady)
    peak = peak_flops(torch.cuda.get_device_name()) if device == 'gpu' else None
    ckpt = Path(cfg.save_folder) / 'latest-rank0.pt'
    batches = int(trainer.state.timestamp.batch)
    parents[name] = (str(ckpt.resolve()), batches)
    trainer.close()
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device == 'gpu' else None
    del trainer, model, batch0
    gc.collect()  # the next recipe's peak memory is its own
    if device == 'gpu':
        torch.cuda.empty_cache()
    return {'recipe': name, 'ok': math.isfinite(loss), 'loss': loss, 'step_s': step_s,
            'batches': batches, 'batch_size': batch, 'peak_mem_gib': peak_mem,
            'gflop_per_step': flops / 1e9, 'mfu': flops / step_s / peak if peak else None,
            'precision': cfg.precision, 'fsdp': cfg.fsdp_config is not None}


def raw_weights_only(name: str) -> bool:
    """Whether the recipe loads weights only (its clock starts at 0) rather than a full state."""
    from diffusion.config import load_config
    return bool(load_config(REPO / 'yamls' / name).load_weights_only)


def _fmt(value: Any, spec: str) -> str:
    """``value`` in ``spec`` (width first, e.g. ``'8.3f'``), or ``-`` at the same width."""
    return format(value, spec) if value is not None else '-'.rjust(int(spec.split('.')[0]))


def table(rows: list[dict[str, Any]]) -> str:
    head = f'{"recipe":32} {"ok":4} {"step s":>8} {"peak GiB":>9} {"GFLOP/step":>11} {"MFU":>6} {"loss":>9}'
    lines = [head, '-' * len(head)]
    for r in rows:
        lines.append(f'{r["recipe"]:32} {"yes" if r["ok"] else "NO":4} {_fmt(r.get("step_s"), "8.3f")} '
                     f'{_fmt(r.get("peak_mem_gib"), "9.2f")} {_fmt(r.get("gflop_per_step"), "11.1f")} '
                     f'{_fmt(r.get("mfu"), "6.1%")} {_fmt(r.get("loss"), "9.4f")}'
                     + (f'  {r["error"]}' if r.get('error') else ''))
    return '\n'.join(lines)


def install_wheels(folder: Path) -> None:
    """Install the wheels of ``folder`` beside the interpreter's packages (never over torch), then re-run."""
    site = Path(tempfile.gettempdir()) / 'gpu_check_site'
    wheels = sorted(str(p) for p in folder.glob('*.whl') if not p.name.lower().startswith(('torch-', 'triton-')))
    if not wheels:
        raise SystemExit(f'gpu_check: no wheels in {folder}')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                    '--upgrade', '--target', str(site), *wheels], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get('PYTHONPATH')])))
    argv = [a for i, a in enumerate(sys.argv) if a != '--wheels' and (i == 0 or sys.argv[i - 1] != '--wheels')]
    os.execve(sys.executable, [sys.executable, *argv], env)


def download_wheels(folder: Path, python_version: str) -> int:
    """``pip download --no-deps`` of :data:`CARRIED` for a CPython ``python_version`` Linux x86-64 machine."""
    platforms = [f'--platform=manylinux_2_{n}_x86_64' for n in (17, 27, 28)] + ['--platform=manylinux2014_x86_64']
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '-d', str(folder),
           f'--python-version={python_version}', '--implementation=cp', *platforms, *CARRIED]
    return subprocess.run(cmd).returncode


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split('\n\n')[0])
    p.add_argument('--device', choices=['gpu', 'cpu'], default='gpu', help='cpu: 2 fp32 steps per recipe')
    p.add_argument('--steps', type=int, default=None, help='training steps per recipe (gpu 20, cpu 2)')
    p.add_argument('--batch', type=int, default=None, help='global batch (gpu 32, cpu 2)')
    p.add_argument('--only', nargs='+', default=None, help='recipes (paths under yamls/) to run')
    p.add_argument('--out', type=Path, default=None, help='work folder (default: a temporary one)')
    p.add_argument('--photos', type=Path, default=None, help='an existing demo-photos MDS folder to reuse')
    p.add_argument('--wheels', type=Path, default=None, help='install these wheels (no deps, torch kept) first')
    p.add_argument('--download-wheels', type=Path, default=None, help='fetch the CARRIED wheels here, then exit')
    p.add_argument('--python-version', default='3.12', help='for --download-wheels')
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.download_wheels, args.python_version)
    import torch
    if args.device == 'gpu' and not torch.cuda.is_available():
        print('gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu for the '
              'CPU rehearsal', file=sys.stderr)
        return 2
    if args.wheels:
        install_wheels(args.wheels)  # does not return
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    steps = args.steps or (20 if args.device == 'gpu' else 2)
    batch = args.batch or (32 if args.device == 'gpu' else 2)
    names = args.only or [n for n in FULL_RECIPES if (REPO / 'yamls' / n).exists()]
    missing = [n for n in names if not (REPO / 'yamls' / n).exists()]
    work = args.out or Path(tempfile.mkdtemp(prefix='gpu_check-'))
    rows, parents = [{'recipe': n, 'ok': False, 'error': 'no such recipe'} for n in missing], {}
    started = time.time()
    todo = [n for n in names if n not in missing]
    if todo:
        from diffusion.builders import import_components
        import_components()
        assets = make_assets(work / 'assets', 'cuda' if args.device == 'gpu' else 'cpu', args.photos)
    for name in todo:
        t0 = time.time()
        try:
            row = run_one(name, assets, work / Path(name).stem, args.device, steps, batch, parents)
        except Exception as err:  # noqa: BLE001  (one failing recipe must not hide the others)
            row = {'recipe': name, 'ok': False, 'error': f'{type(err).__name__}: {str(err)[:300]}'}
        row['wall_s'] = time.time() - t0
        rows.append(row)
        print(f'gpu_check: {name}: {"ok" if row["ok"] else "FAILED"} in {row["wall_s"]:.0f} s', flush=True)
    print(table(rows))
    device_name = torch.cuda.get_device_name() if args.device == 'gpu' else 'cpu'
    print(json.dumps({'device': device_name, 'steps': steps, 'batch': batch, 'total_s': round(time.time() - started),
                      'ok': all(r['ok'] for r in rows), 'recipes': rows}))
    return 0 if all(r['ok'] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
