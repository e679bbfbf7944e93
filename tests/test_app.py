"""The local generation page (``python -m diffusion.app PATH``): over HTTP, and in a real headless Chromium.

The model is a random tiny one (a CLIP-class text encoder, the tiny autoencoder, a 32-channel UNet: 32 px images
in a fraction of a second), written the three ways the page loads a model: a diffusers export, a native export
and a run folder holding a composer-format checkpoint (``{'state': {'model': ...}}`` + ``config.yaml``). The
diffusers export is served by the real command in a subprocess (the page the browser test uses); the other two
are loaded in this process.

The browser is Debian's ``chromium`` (``make test`` installs it with apt-get when it is missing), driven through
the DevTools protocol over a websocket: it types a prompt, clicks Generate and waits for the image. Without
Chromium the browser test fails, saying how to install it.
"""
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path
from urllib.parse import urlencode

import pytest
from PIL import Image

pytestmark = pytest.mark.integration  # processes of its own or a whole pipeline: pytest -m "not integration" skips it

REPO = Path(__file__).resolve().parents[1]
# The tiny UNet downsamples 8x and the tiny autoencoder 4x: sides are multiples of 32; the default is 32 px.
MODEL = {
    'name': 'latent_diffusion',
    'autoencoder': {'name': 'autoencoder_kl', 'config': 'tiny'},
    'text_encoder': {'name': 'tiny_clip', 'hidden_size': 32, 'projection_dim': 32},
    'backbone': {'name': 'unet', 'preset': 'mini-s', 'sample_size': 8, 'block_out_channels': [32, 32, 32, 32],
                 'attention_head_dim': [1, 1, 1, 1]},
    'noise_schedule': {'name': 'ddpm', 'prediction_type': 'epsilon'},
    'use_text_mask': False,
}
# The app's torch uses one thread: where other processes share the cores (a test machine), torch's OpenMP threads
# wait on each other and this tiny model samples about 100x slower with two threads than with one.
ONE_THREAD = {'OMP_NUM_THREADS': '1'}
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--disable-dev-shm-usage', '--window-size=760,900', '--remote-debugging-port=0']


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    """The same random tiny model as a diffusers export, a native export and a run folder."""
    import torch
    from omegaconf import OmegaConf

    from diffusion import registry
    from diffusion.export.native import export_native
    from diffusion.export.to_diffusers import export_pipeline
    root = tmp_path_factory.mktemp('app_model')
    torch.manual_seed(0)
    model = registry.build(registry.models, MODEL, 'model').eval()
    export_pipeline(model, root / 'diffusers', sampler='ddim')
    export_native(model, MODEL, root / 'native', generation={'sampler': 'ddim', 'num_inference_steps': 4,
                                                             'guidance_scale': 3.0})
    checkpoints = root / 'run' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    OmegaConf.save({'model': MODEL, 'train_loader': {'name': 'image_caption', 'local': str(root / 'unused')},
                    'optimizer': {'name': 'decoupled_adamw'}, 'max_duration': '1ba', 'global_train_batch_size': 1},
                   checkpoints / 'config.yaml')
    torch.save({'state': {'model': model.state_dict(), 'run_name': 'app-test'}}, checkpoints / 'ep0-ba0-rank0.pt')
    return {'diffusers': root / 'diffusers', 'native': root / 'native', 'run': root / 'run'}


@pytest.fixture(scope='module')
def app_url(sources, tmp_path_factory):
    """``python -m diffusion.app EXPORT --port 0`` in a subprocess; yields the URL it prints."""
    log = tmp_path_factory.mktemp('app_log') / 'app.log'
    with log.open('w') as err:
        proc = subprocess.Popen([sys.executable, '-m', 'diffusion.app', str(sources['diffusers']), '--port', '0',
                                 '--device', 'cpu'], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, **ONE_THREAD})
    lines = []
    try:
        for line in proc.stdout:  # "loading ...", the model line, then "open http://127.0.0.1:PORT/ ..."
            lines.append(line)
            found = re.search(r'http://\S+/', line)
            if found:
                break
        assert found, f'the app printed no URL: {lines} {log.read_text()}'
        assert lines[0].startswith('loading ') and 'StableDiffusionPipeline' in ''.join(lines), lines
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
        yield found.group(0)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the server closes and the command exits 0
        assert proc.wait(timeout=30) == 0, log.read_text()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.status, response.headers['Content-Type'], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers['Content-Type'], err.read()


def _image(base: str, **settings) -> bytes:
    status, kind, data = _get(f'{base}image?{urlencode(settings)}')
    assert status == 200 and kind == 'image/png', (status, kind, data[:200])
    return data


def test_page_over_http(app_url, sources):
    status, kind, page = _get(app_url)
    page = page.decode()
    assert status == 200 and kind.startswith('text/html')
    for field in ('prompt', 'seed', 'steps', 'guidance', 'width', 'height'):
        assert f'name="{field}"' in page, field
    assert 'id="generate"' in page and 'StableDiffusionPipeline' in page
    assert 'id="result"' not in page  # no image before a prompt is given

    # A request makes a PNG of the requested size; the same seed gives the same image, another seed another.
    ask = {'prompt': 'a red lighthouse', 'seed': 7, 'steps': 2, 'guidance': 4.0}
    first = _image(app_url, **ask, width=64, height=32)
    assert Image.open(BytesIO(first)).size == (64, 32)
    assert _image(app_url, **ask, width=64, height=32) == first
    assert _image(app_url, **{**ask, 'seed': 8}, width=64, height=32) != first
    assert Image.open(BytesIO(_image(app_url, prompt='', steps=1))).size == (32, 32)  # the model's default size

    # The page with settings shows them and the image link with the same query.
    status, _, shown = _get(f'{app_url}?{urlencode({**ask, "width": 64, "height": 32})}')
    assert status == 200 and 'value="a red lighthouse"' in shown.decode() and 'id="result"' in shown.decode()
    # A bad setting is a 400 with a one-line reason, on the page and for the image; the server keeps serving.
    for bad, words in [({'steps': 'many'}, 'steps must be an integer'), ({'width': 40}, 'multiple of 32'),
                       ({'steps': 0}, 'between 1 and')]:
        status, kind, body = _get(f'{app_url}image?{urlencode({"prompt": "x", **bad})}')
        assert status == 400 and kind.startswith('text/plain') and words in body.decode(), (bad, body)
        assert len(body.decode().strip().splitlines()) == 1
        status, _, page = _get(f'{app_url}?{urlencode({"prompt": "x", **bad})}')
        assert status == 400 and words in page.decode() and 'id="result"' not in page.decode()
    assert _get(f'{app_url}nothing')[0] == 404


def test_run_folder_and_native_export(sources):
    """A run folder and a native export load too (here in this process), each with its own defaults."""
    import torch

    from diffusion.app import find_source, load
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the app's subprocess (ONE_THREAD); the test process's own count comes back
    try:
        for kind, words, steps in (('run', 'using ', 50), ('native', 'native export', 4)):
            source = find_source(str(sources[kind]))
            assert source.kind == ('checkpoint' if kind == 'run' else kind)
            model = load(source, 'cpu')
            assert words in model.description and model.defaults['steps'] == steps and model.multiple == 32
            make = lambda seed: model.image('a red lighthouse', seed, 2, 4.0, 64, 32).tobytes()  # noqa: E731
            assert model.image('a red lighthouse', 3, 2, 4.0, 64, 32).size == (64, 32)
            assert make(3) == make(3) != make(4)
    finally:
        torch.set_num_threads(threads)


def test_wrong_path_is_one_line_exit_2(tmp_path):
    (tmp_path / 'empty').mkdir()
    for path, words in [(tmp_path / 'nope', 'does not exist'), (tmp_path / 'empty', 'holds no composer checkpoint')]:
        result = subprocess.run([sys.executable, '-m', 'diffusion.app', str(path)], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr and str(path) in result.stderr
        assert result.stdout == ''


# ---------------------------------------------------------------------------------------------
# A real browser
# ---------------------------------------------------------------------------------------------
def _chromium() -> str:
    found = os.environ.get('CHROMIUM') or next(
        (shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(n)), None)
    if not found:
        pytest.fail('Chromium is not installed, so the page cannot be tested in a browser: `make test` installs it '
                    '(apt-get install chromium, as root), or set CHROMIUM=/path/to/chromium')
    return found


class DevTools:
    """A page of a headless Chromium, driven through the DevTools protocol (a websocket, JSON messages)."""

    def __init__(self, websocket_url: str):
        from websockets.sync.client import connect
        self.ws = connect(websocket_url, max_size=2**26, open_timeout=30)
        self.next_id = 0

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({'id': self.next_id, 'method': method, 'params': params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.ws.recv(timeout=60))
            if message.get('id') == self.next_id:
                assert 'error' not in message, (method, message['error'])
                return message['result']

    def js(self, expression: str):
        result = self.send('Runtime.evaluate', expression=expression, returnByValue=True, awaitPromise=True)
        assert 'exceptionDetails' not in result, (expression, result['exceptionDetails'])
        return result['result'].get('value')

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f'{what}: not after {timeout} s; the page: {self.js("document.body.innerText")!r}')

    def click(self, selector: str):
        box = self.js(f'JSON.stringify(document.querySelector({json.dumps(selector)}).getBoundingClientRect())')
        box = json.loads(box)
        x, y = box['x'] + box['width'] / 2, box['y'] + box['height'] / 2
        self.send('Input.dispatchMouseEvent', type='mouseMoved', x=x, y=y)
        for kind in ('mousePressed', 'mouseReleased'):
            self.send('Input.dispatchMouseEvent', type=kind, x=x, y=y, button='left', clickCount=1)

    def type(self, text: str):
        for char in text:  # one key press per character, as a person types
            self.send('Input.dispatchKeyEvent', type='keyDown', text=char, key=char, unmodifiedText=char)
            self.send('Input.dispatchKeyEvent', type='keyUp', key=char)


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with a fresh profile (offline flags); yields a DevTools page."""
    profile = tmp_path / 'profile'
    log_path = tmp_path / 'chromium.log'
    log = log_path.open('w')
    proc = subprocess.Popen([_chromium(), *CHROMIUM_FLAGS, f'--user-data-dir={profile}', 'about:blank'],
                            stdout=log, stderr=log, start_new_session=True)
    try:
        port_file = profile / 'DevToolsActivePort'  # Chromium writes its DevTools port here once it listens
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count('\n') >= 1):
            assert proc.poll() is None, f'Chromium exited ({proc.returncode}): {log_path.read_text()}'
            assert time.monotonic() < deadline, 'Chromium did not open its DevTools port in 60 s'
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=30) as response:
            page = next(t for t in json.load(response) if t['type'] == 'page')
        tools = DevTools(page['webSocketDebuggerUrl'])
        yield tools
        tools.ws.close()
    finally:
        # The browser and its helper processes (a session of their own); the profile is thrown away, so no
        # orderly shutdown (SIGTERM takes Chromium seconds).
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def test_page_in_headless_chromium(app_url, browser, tmp_path):
    browser.send('Page.enable')
    browser.send('Page.navigate', url=app_url)
    browser.wait_for('document.readyState === "complete" && !!document.querySelector("#prompt")', 30, 'the form')
    browser.js('document.querySelector("#steps").value = "3"')
    browser.click('#prompt')
    browser.js('document.querySelector("#prompt").select()')
    browser.type('a lighthouse at dusk')
    assert browser.js('document.querySelector("#prompt").value') == 'a lighthouse at dusk'
    browser.click('#generate')
    size = browser.wait_for('(() => { const i = document.querySelector("#result");'
                            ' return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null'
                            ' })()', 90, 'the generated image')
    assert size == [32, 32]
    assert browser.js('new URLSearchParams(location.search).get("prompt")') == 'a lighthouse at dusk'
    assert browser.js('document.querySelector("#prompt").value') == 'a lighthouse at dusk'  # the form keeps it
    browser.wait_for('document.querySelector("#status").textContent.startsWith("seed 0, 3 steps")', 10, 'the status')
    shot = base64.b64decode(browser.send('Page.captureScreenshot', format='png')['data'])
    (tmp_path / 'app.png').write_bytes(shot)
    assert Image.open(BytesIO(shot)).size[0] > 0
