"""A local generation page: ``python -m diffusion.app PATH [--port 7860] [--host 127.0.0.1]``, then open the URL.

``PATH`` is what training or export left:

* a diffusers pipeline folder (``convert/export_diffusers.py``; it holds ``model_index.json``), loaded with
  ``diffusers.DiffusionPipeline.from_pretrained`` and sampled by that pipeline with the scheduler it was saved with;
* a native export folder (``python -m diffusion.export.native``; ``config.json`` of format ``diffusion-native``);
* a run folder (``outputs/RUN``), its ``checkpoints/`` folder or a checkpoint file, loaded with
  ``diffusion.checkpoints.load_model`` (EMA weights when the run has them; ``--weights training`` for the others).

The model loads once; every request makes one image from its prompt, seed, steps, guidance and size, with
``diffusion.evaluation.generate.generate_images`` (runs and native exports) or the pipeline's own call. The seed
is the image's own CPU generator (``diffusion/samplers.py``), so seed ``s`` gives the image ``run_generate.py``
makes for a first prompt with ``seed=s``, and the same request always gives the same image.

The page is the standard library's ``http.server`` and an HTML form, no JavaScript framework:

* ``GET /``: the form (prompt, seed, steps, guidance, width, height, Generate); submitting it reloads the page with
  the settings in the query, which shows the image from ``/image`` with the same query;
* ``GET /image?prompt=...&seed=0&steps=50&guidance=7.5&width=64&height=64``: the PNG (an omitted setting takes the
  model's default); a bad setting is a 400 and a failed generation a 500, each with a one-line text reason.

Requests are served in threads; one image is generated at a time. A path that is none of the above is one line on
stderr and exit status 2, before torch is imported.
"""
from __future__ import annotations

import argparse
import html
import inspect
import io
import json
import pickle
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import parse_qs, urlencode, urlsplit

from diffusion.config import ConfigError

__all__ = ['Source', 'LoadedModel', 'find_source', 'load', 'make_server', 'main']

MAX_STEPS = 1000
MAX_SIDE = 2048
MAX_PROMPT = 2000


@dataclass
class Source:
    """What a path names: ``kind`` is ``'diffusers'``, ``'native'`` or ``'checkpoint'``; ``path`` what loads."""
    kind: str
    path: str


def find_source(path: str) -> Source:
    """Classify ``path`` without importing torch.

    Raises:
        ConfigError: The path does not exist, or is a folder that is neither an export nor a run (one line).
    """
    from diffusion.evaluation.run_args import checkpoint_source
    p = Path(path)
    if not p.exists():
        raise ConfigError(f'{path} does not exist (give an exported folder, a run folder such as outputs/RUN, its '
                          'checkpoints/ folder or a .pt file)')
    if p.is_dir() and (p / 'model_index.json').is_file():
        return Source('diffusers', str(p))
    if p.is_dir() and (p / 'config.json').is_file():
        try:
            fmt = json.loads((p / 'config.json').read_text(encoding='utf-8')).get('format')
        except (ValueError, AttributeError):
            fmt = None
        if fmt == 'diffusion-native':
            return Source('native', str(p))
    try:
        return Source('checkpoint', checkpoint_source(str(p)))
    except ConfigError as err:
        raise ConfigError(f'{err}; nor is it an exported folder (model_index.json or a diffusion-native '
                          'config.json)') from None


class LoadedModel:
    """A model loaded once, and how to make one image with it.

    Attributes:
        description: One line: what was loaded (shown on the page and printed at start).
        defaults: ``steps``, ``guidance``, ``width``, ``height`` and ``sampler`` used for an omitted setting.
        multiple: Width and height must be multiples of this (the autoencoder's factor times the UNet's
            downsampling).
    """

    def __init__(self, description: str, defaults: dict[str, Any], multiple: int,
                 make: Callable[[str, int, int, float, int, int], Any]):
        self.description, self.defaults, self.multiple, self._make = description, defaults, multiple, make
        self._lock = threading.Lock()

    def image(self, prompt: str, seed: int, steps: int, guidance: float, width: int, height: int) -> Any:
        """One PIL image; generations run one at a time."""
        with self._lock:
            return self._make(prompt, seed, steps, guidance, width, height)


def _unet_downsampling(unet: Any) -> int:
    return 2 ** (len(unet.config.block_out_channels) - 1)


def _library_model(model: Any, description: str, sampling: dict[str, Any]) -> LoadedModel:
    """A ``LatentDiffusion``, sampled by ``generate_images`` with the run's (or export's) sampler."""
    from diffusion.evaluation.generate import default_size, generate_images
    size = default_size(model)
    unet = getattr(model.backbone, 'unet', None)
    multiple = model.autoencoder.downsample_factor * (_unet_downsampling(unet) if unet is not None else 1)
    sampler = sampling['sampler']

    def make(prompt: str, seed: int, steps: int, guidance: float, width: int, height: int) -> Any:
        return generate_images(model, [prompt], [seed], guidance_scale=guidance, num_inference_steps=steps,
                               sampler=sampler, height=height, width=width)[0]

    defaults = {'steps': int(sampling['num_inference_steps']), 'guidance': float(sampling['guidance_scale']),
                'width': size, 'height': size, 'sampler': sampler}
    return LoadedModel(description, defaults, multiple, make)


def _pipeline_model(folder: str, device: str) -> LoadedModel:
    """A diffusers pipeline folder, sampled by the pipeline with per-image CPU generators."""
    import diffusers

    from diffusion.samplers import image_generators
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    call = inspect.signature(pipe.__call__).parameters  # the pipeline's own defaults for steps and guidance
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    def make(prompt: str, seed: int, steps: int, guidance: float, width: int, height: int) -> Any:
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                    generator=image_generators([seed]), output_type='pil').images[0]

    scheduler = type(pipe.scheduler).__name__
    defaults = {'steps': int(call['num_inference_steps'].default), 'guidance': float(call['guidance_scale'].default),
                'width': size, 'height': size, 'sampler': scheduler}
    description = f'diffusers {type(pipe).__name__} from {folder} ({scheduler}) on {device}'
    return LoadedModel(description, defaults, int(pipe.vae_scale_factor) * _unet_downsampling(pipe.unet), make)


def load(source: Source, device: Optional[str] = None, weights: str = 'auto') -> LoadedModel:
    """Load the model ``source`` names (once) onto ``device`` (default: CUDA when there is one)."""
    import torch
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if source.kind == 'diffusers':
        return _pipeline_model(source.path, device)
    if source.kind == 'native':
        from diffusion.export.native import CONFIG_NAME, load_native
        from diffusion.samplers import resolve_sampling
        model = load_native(source.path, device)
        generation = json.loads((Path(source.path) / CONFIG_NAME).read_text(encoding='utf-8'))['generation']
        sampling = resolve_sampling(model, generation.get('sampler'), generation.get('num_inference_steps'),
                                    generation.get('guidance_scale'))
        return _library_model(model, f'native export {source.path} ({type(model.backbone).__name__}) on {device}',
                              sampling)
    from diffusion.checkpoints import load_model
    from diffusion.evaluation.run_args import checkpoint_line
    from diffusion.samplers import resolve_sampling
    model, info = load_model(source.path, weights=weights, device=device)
    return _library_model(model, f'{checkpoint_line(info)} on {device}', resolve_sampling(model))


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
class BadRequest(ValueError):
    """A setting in the query that cannot be used (the message is the one-line reason)."""


def _settings(query: dict[str, list[str]], model: LoadedModel) -> dict[str, Any]:
    """The request's settings, each omitted or empty one from ``model.defaults``; :class:`BadRequest` if wrong."""
    def get(name: str, kind: type, default: Any) -> Any:
        raw = (query.get(name) or [''])[0].strip()
        if not raw:
            return default
        try:
            return kind(raw)
        except ValueError:
            raise BadRequest(f'{name} must be {"an integer" if kind is int else "a number"}, got {raw!r}') from None

    d = model.defaults
    out = {'prompt': (query.get('prompt') or [''])[0].strip(), 'seed': get('seed', int, 0),
           'steps': get('steps', int, d['steps']), 'guidance': get('guidance', float, d['guidance']),
           'width': get('width', int, d['width']), 'height': get('height', int, d['height'])}
    if len(out['prompt']) > MAX_PROMPT:
        raise BadRequest(f'the prompt is longer than {MAX_PROMPT} characters')
    if not 1 <= out['steps'] <= MAX_STEPS:
        raise BadRequest(f'steps must be between 1 and {MAX_STEPS}, got {out["steps"]}')
    if not 0 <= out['seed'] < 2**63:
        raise BadRequest(f'seed must be between 0 and 2**63 - 1, got {out["seed"]}')
    if out['guidance'] != out['guidance'] or abs(out['guidance']) > 100:
        raise BadRequest(f'guidance must be a number between -100 and 100, got {out["guidance"]}')
    for side in ('width', 'height'):
        if not (0 < out[side] <= MAX_SIDE and out[side] % model.multiple == 0):
            raise BadRequest(f'{side} must be a multiple of {model.multiple} up to {MAX_SIDE}, got {out[side]}')
    return out


_STYLE = """
*, *::before, *::after { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; max-width: 44rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.3rem; margin-bottom: .2rem; }
.model { color: #666; font-size: .85rem; margin-top: 0; overflow-wrap: anywhere; }
form { display: grid; grid-template-columns: repeat(5, minmax(0, 1fr)); gap: .6rem .8rem; }
label { font-size: .8rem; color: #555; display: flex; flex-direction: column; gap: .2rem; }
label.prompt { grid-column: 1 / -1; }
input { font: inherit; width: 100%; padding: .35rem .45rem; border: 1px solid #bbb; border-radius: 4px; }
button { grid-column: 1 / -1; justify-self: start; font: inherit; padding: .45rem 1.4rem; border: 0;
         border-radius: 4px; background: #2b5fd9; color: white; cursor: pointer; }
#result { display: block; margin-top: .4rem; width: 384px; max-width: 100%; image-rendering: pixelated;
          border: 1px solid #ddd; background: #f4f4f4; }
#status { color: #555; font-size: .85rem; margin-top: 1.2rem; }
"""


def _page(model: LoadedModel, query: dict[str, list[str]]) -> tuple[int, str]:
    """The HTML page: the form, filled with the query's settings, and the image when a prompt was given."""
    error, shown = None, None
    try:
        settings = _settings(query, model)
    except BadRequest as err:
        error, settings = str(err), {'prompt': (query.get('prompt') or [''])[0], 'seed': 0, **model.defaults}
        for name in ('seed', 'steps', 'guidance', 'width', 'height'):
            settings[name] = (query.get(name) or [settings[name]])[0]
    if error is None and 'prompt' in query:
        shown = {k: settings[k] for k in ('prompt', 'seed', 'steps', 'guidance', 'width', 'height')}
    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    d = model.defaults
    side = f'min="{model.multiple}" step="{model.multiple}"'
    inputs = (('seed', 'min="0" step="1"'), ('steps', f'min="1" max="{MAX_STEPS}" step="1"'),
              ('guidance', 'step="any"'), ('width', side), ('height', side))
    fields = ''.join(f'<label>{name}<input type="number" id="{name}" name="{name}" value="{e(settings[name])}" '
                     f'{extra}></label>' for name, extra in inputs)
    defaults = (f'defaults: {d["sampler"]}, {d["steps"]} steps, guidance {d["guidance"]}, {d["width"]}x{d["height"]}; '
                f'sides are multiples of {model.multiple}')
    body = [f'<h1>Generate</h1><p class="model">{e(model.description)}<br>{e(defaults)}</p>',
            '<form method="get" action="/">',
            f'<label class="prompt">prompt<input type="text" id="prompt" name="prompt" value="{e(settings["prompt"])}" '
            'placeholder="a lighthouse on a cliff at sunset" autofocus></label>',
            fields, '<button type="submit" id="generate">Generate</button></form>']
    if error is not None:
        body.append(f'<p id="status" role="alert">{e(error)}</p>')
    elif shown is not None:
        src = '/image?' + urlencode(shown)
        line = (f'seed {shown["seed"]}, {shown["steps"]} steps, guidance {shown["guidance"]}, '
                f'{shown["width"]}x{shown["height"]}')
        body.append(f'<p id="status">generating ({e(line)})...</p>'
                    f'<img id="result" src="{e(src)}" alt="{e(shown["prompt"])}" '
                    f'onload="document.getElementById(\'status\').textContent = {e(json.dumps(line))}" '
                    f'onerror="document.getElementById(\'status\').innerHTML = \'generation failed: '
                    f'<a href=&quot;{e(src)}&quot;>the reason</a>\'">'
                    f'<p><a href="{e(src)}" download="generated-{e(shown["seed"])}.png">download the PNG</a></p>')
    page = ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Generate</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>'
            f'<body>{"".join(body)}</body></html>')
    return (400 if error else 200), page


def make_server(model: LoadedModel, host: str = '127.0.0.1', port: int = 7860,
                log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
                ) -> ThreadingHTTPServer:
    """An HTTP server for the page (``port`` 0: a free port; ``server.server_address`` says which).

    Raises:
        OSError: The address cannot be bound (e.g. the port is in use).
    """

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, kind: str, data: bytes) -> None:
            self.send_response(status)
            self.send_header('Content-Type', kind)
            self.send_header('Content-Length', str(len(data)))
            self.send_header('Cache-Control', 'no-store')
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlsplit(self.path)
            query = parse_qs(url.query, keep_blank_values=True)
            if url.path == '/':
                status, page = _page(model, query)
                self._send(status, 'text/html; charset=utf-8', page.encode('utf-8'))
            elif url.path == '/image':
                self._image(query)
            else:
                self._send(404, 'text/plain; charset=utf-8', b'not found: the page is / and images are /image\n')

        def _image(self, query: dict[str, list[str]]) -> None:
            try:
                s = _settings(query, model)
            except BadRequest as err:
                self._send(400, 'text/plain; charset=utf-8', f'{err}\n'.encode('utf-8'))
                return
            start = time.perf_counter()
            try:
                image = model.image(s['prompt'], s['seed'], s['steps'], s['guidance'], s['width'], s['height'])
            except Exception as err:  # the reason goes to the page; the server keeps serving
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                log(f'generation failed: {type(err).__name__}: {reason}')
                self._send(500, 'text/plain; charset=utf-8', f'generation failed: {reason}\n'.encode('utf-8'))
                return
            buffer = io.BytesIO()
            image.save(buffer, format='PNG')
            log(f'{s["prompt"]!r}: seed {s["seed"]}, {s["steps"]} steps, guidance {s["guidance"]}, '
                f'{s["width"]}x{s["height"]} in {time.perf_counter() - start:.1f} s')
            self._send(200, 'image/png', buffer.getvalue())

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - generations are logged instead
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Load the model, print the URL and serve until Ctrl-C; exit status 2 with one line for a wrong path."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog='python -m diffusion.app',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('path', help='an exported folder (diffusers or native), a run folder (outputs/RUN), its '
                        'checkpoints/ folder or a checkpoint file')
    parser.add_argument('--port', type=int, default=7860, help='port to listen on (0: any free port; default 7860)')
    parser.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1: this '
                        'machine only)')
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... (default: cuda when there is one)')
    parser.add_argument('--weights', default='auto', choices=('auto', 'ema', 'training'),
                        help='for a run: auto = EMA weights when the run has them (default)')
    args = parser.parse_args(argv)
    try:
        source = find_source(args.path)
    except ConfigError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'loading {source.path} ({source.kind})...', flush=True)
    try:
        model = load(source, args.device, args.weights)
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as err:  # OSError: FileNotFoundError
        print(f'error: cannot load {args.path}: {(str(err).strip().splitlines() or [type(err).__name__])[0]}',
              file=sys.stderr)
        return 2
    try:
        server = make_server(model, args.host, args.port)
    except OSError as err:
        print(f'error: cannot listen on {args.host}:{args.port}: {err.strerror or err}', file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f'{model.description}\nopen http://{host}:{port}/ in a browser (Ctrl-C to stop)', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
