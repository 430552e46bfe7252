#!/usr/bin/env python3
"""dashboard_test.py: the built-in web dashboard in a real headless browser.

Starts a zeroq-server with one tenant, uploads the model and submits a
mixed-precision job through the HTTP API, opens the dashboard in headless
Chromium (driven by chromedriver over the W3C WebDriver protocol: plain HTTP
and JSON, no Selenium), types the API key into the page and checks the live
DOM:

  * without a key the page asks for one; the key lands in sessionStorage;
  * the job appears in the list, streams live, and its progress bar advances
    while it runs;
  * once it succeeded, its detail shows the Pareto frontier (every point, one
    chosen), the per-layer bits (as the API reports them), stage timings, the
    distillation loss chart and the artifacts, and an artifact's button saves
    the bytes the API serves;
  * with 200 more jobs listed, a full refresh of the list renders within 1 s
    and no more than 4 event streams are open;
  * the cancel button cancels a running job; "Forget" clears the key.

Saves OUT/dashboard.png (the succeeded job's detail) and logs in OUT.

  dashboard_test.py --server build/server/zeroq-server \\
      --worker build/core/worker/zeroq-worker \\
      --model tests/models/fashion_cnn.pt --out build/tests/dashboard

Python 3 standard library only, plus Debian's chromium and chromium-driver.
Exit status 0 when every check passes, 1 otherwise.
"""
import argparse
import base64
import concurrent.futures
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

START = time.monotonic()
TERMINAL = {'JOB_SUCCEEDED', 'JOB_FAILED', 'JOB_CANCELLED'}
ELEMENT = 'element-6066-11e4-a52e-4f735466cecf'  # W3C WebDriver element key


class Failure(Exception):
    """A check that did not hold; the message says which and why."""


def log(message):
    print(f'[{time.monotonic() - START:6.1f}s] {message}', flush=True)


def check(condition, message):
    if not condition:
        raise Failure(message)


def wait_for(what, probe, timeout, interval=0.2):
    """Calls probe() until it returns something truthy; fails after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise Failure(f'timed out after {timeout:.0f} s waiting for {what} (last seen: {last!r})')


def http(method, url, body=None, headers=None, timeout=30):
    """One request; returns (status, body bytes). Non-2xx is not an error here."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ------------------------------------------------------------ the HTTP API

class Api:
    def __init__(self, port, key):
        self.base = f'http://127.0.0.1:{port}'
        self.key = key

    def call(self, method, path, payload=None, raw=None, content_type='application/json'):
        headers = {'Authorization': f'Bearer {self.key}'}
        body = raw
        if payload is not None:
            body = json.dumps(payload).encode()
        if body is not None:
            headers['Content-Type'] = content_type
        status, data = http(method, self.base + path, body, headers)
        if not 200 <= status < 300:
            raise Failure(f'{method} {path}: HTTP {status}: {data[:500].decode(errors="replace")}')
        return json.loads(data) if data else {}

    def upload_model(self, path, input_shape):
        data = Path(path).read_bytes()
        query = urllib.parse.urlencode({'name': Path(path).stem, 'input_shape': input_shape,
                                        'sha256': hashlib.sha256(data).hexdigest()})
        model = self.call('POST', f'/v1/models?{query}', raw=data,
                          content_type='application/octet-stream')
        model_id = model['id']

        def ready():
            m = self.call('GET', f'/v1/models/{model_id}')
            if m.get('state') == 'MODEL_INVALID':
                raise Failure(f'model {model_id} is invalid: {m.get("stateReason")}')
            return m if m.get('state') == 'MODEL_READY' else None
        wait_for(f'model {model_id} to be READY', ready, 90, 0.3)
        return model_id

    def submit(self, model_id, config):
        return self.call('POST', '/v1/jobs', {'modelId': model_id, 'config': config,
                                              'device': 'DEVICE_CPU'})['id']

    def job(self, job_id):
        return self.call('GET', f'/v1/jobs/{job_id}')


# ------------------------------------------------------------ WebDriver

class Browser:
    """Headless Chromium through chromedriver, W3C WebDriver over HTTP JSON."""

    def __init__(self, chromedriver, chromium, profile_dir, download_dir, out_dir):
        self.port = free_port()
        self.log_file = open(out_dir / 'chromedriver.log', 'wb')
        self.driver = subprocess.Popen(
            [chromedriver, f'--port={self.port}', f'--log-path={out_dir / "chromedriver-verbose.log"}'],
            stdout=self.log_file, stderr=subprocess.STDOUT)
        self.base = f'http://127.0.0.1:{self.port}'
        self.session = None
        wait_for('chromedriver to start',
                 lambda: self._ready() or self._exited('chromedriver'), 20)
        capabilities = {
            'browserName': 'chrome',
            'goog:chromeOptions': {
                'binary': chromium,
                'args': ['--headless=new', '--no-sandbox', '--disable-gpu', '--window-size=1400,1000',
                         '--disable-dev-shm-usage', '--no-first-run', '--disable-extensions',
                         '--disable-background-networking', f'--user-data-dir={profile_dir}'],
                'prefs': {'download.default_directory': str(download_dir),
                          'download.prompt_for_download': False},
            },
            'goog:loggingPrefs': {'browser': 'ALL'},
        }
        reply = self._call('POST', '/session', {'capabilities': {'alwaysMatch': capabilities}})
        self.session = reply['sessionId']

    def _ready(self):
        try:
            status, data = http('GET', self.base + '/status', timeout=2)
            return status == 200 and json.loads(data)['value'].get('ready')
        except OSError:
            return False

    def _exited(self, name):
        if self.driver.poll() is not None:
            raise Failure(f'{name} exited with status {self.driver.returncode}')
        return False

    def _call(self, method, path, payload=None, timeout=60):
        body = json.dumps(payload).encode() if payload is not None else None
        status, data = http(method, self.base + path, body,
                            {'Content-Type': 'application/json'}, timeout)
        value = json.loads(data).get('value') if data else None
        if status != 200:
            detail = value.get('message', '') if isinstance(value, dict) else data[:300]
            raise Failure(f'WebDriver {method} {path}: HTTP {status}: {str(detail)[:800]}')
        return value

    def _session_call(self, method, path, payload=None, timeout=60):
        return self._call(method, f'/session/{self.session}{path}', payload, timeout)

    def open(self, url):
        self._session_call('POST', '/url', {'url': url})

    def find(self, css):
        return self._session_call('POST', '/element', {'using': 'css selector', 'value': css})[ELEMENT]

    def click(self, css):
        self._session_call('POST', f'/element/{self.find(css)}/click', {})

    def type(self, css, text):
        self._session_call('POST', f'/element/{self.find(css)}/value', {'text': text})

    def js(self, script, *args):
        """Runs a function body in the page; a returned promise is awaited."""
        return self._session_call('POST', '/execute/sync', {'script': script, 'args': list(args)})

    def screenshot(self, path):
        png = base64.b64decode(self._session_call('GET', '/screenshot'))
        check(png.startswith(b'\x89PNG\r\n\x1a\n'), 'the screenshot is not a PNG')
        path.write_bytes(png)
        return len(png)

    def console(self):
        try:  # chromedriver's extension; the log is a help, not a check
            return self._session_call('POST', '/se/log', {'type': 'browser'})
        except Failure:
            return []

    def close(self):
        if self.session:
            try:
                self._session_call('DELETE', '', timeout=20)
            except (Failure, OSError):
                pass
        self.driver.terminate()
        try:
            self.driver.wait(10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
        self.log_file.close()


# ------------------------------------------------------------ the server

class Server:
    def __init__(self, binary, worker, tmp, key, out_dir):
        data = tmp / 'data'
        data.mkdir()
        tenants = {'tenants': [{'name': 'acme',
                                'api_key_sha256': [hashlib.sha256(key.encode()).hexdigest()]}]}
        (tmp / 'tenants.json').write_text(json.dumps(tenants))
        self.http_port_file = tmp / 'http_port'
        self.log_path = out_dir / 'server.log'
        self.log_file = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(
            [binary, f'--data_dir={data}', '--listen=127.0.0.1:0', f'--port_file={tmp / "port"}',
             '--http_listen=127.0.0.1:0', f'--http_port_file={self.http_port_file}',
             '--metrics_listen=', f'--worker={worker}', '--devices=cpu:1', '--threads_per_job=1',
             f'--tenants_file={tmp / "tenants.json"}'],
            stdout=self.log_file, stderr=subprocess.STDOUT)
        self.http_port = wait_for('the server to write its HTTP port', self._port, 30, 0.1)

    def _port(self):
        if self.proc.poll() is not None:
            raise Failure(f'zeroq-server exited with status {self.proc.returncode}:\n{self.log_tail()}')
        try:
            return int(self.http_port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def log_tail(self, lines=30):
        try:
            return '\n'.join(self.log_path.read_text(errors='replace').splitlines()[-lines:])
        except OSError:
            return ''

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                log('the server did not stop within 30 s of SIGTERM: killing it')
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


# ------------------------------------------------------------ page probes

ROW_INFO = '''
const tr = document.querySelector(`#job-rows tr[data-job-id="${CSS.escape(arguments[0])}"]`);
if (!tr) return null;
return {state: tr.dataset.state, stage: tr.dataset.stage, live: tr.hasAttribute('data-live'),
        value: parseFloat(tr.querySelector('.progress').dataset.value)};
'''

DETAIL_INFO = '''
const all = (css) => [...document.querySelectorAll(css)];
const line = document.querySelector('#loss svg polyline.line');
return {
  title: document.querySelector('#detail-title').textContent,
  points: all('#frontier svg circle.point').length,
  chosen: all('#frontier svg circle.chosen').length,
  layers: all('#layers tbody tr').map((tr) => [...tr.cells].map((td) => td.textContent)),
  stages: all('#stages tbody tr').length,
  lossPoints: line ? line.getAttribute('points').trim().split(/\\s+/).length : 0,
  artifacts: all('#artifacts button.artifact').map((b) => b.dataset.name),
  summary: Object.fromEntries(all('#result-summary dt').map((dt) => [dt.textContent, dt.nextElementSibling.textContent])),
  error: document.querySelector('#detail-error').hidden ? '' : document.querySelector('#detail-error').textContent,
};
'''

TIMED_REFRESH = '''
const t0 = performance.now();
const shown = await window.zeroqDashboard.refresh();
document.body.getBoundingClientRect();                   // layout
await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));  // paint
return {shown, ms: performance.now() - t0,
        rows: document.querySelectorAll('#job-rows tr').length,
        live: document.querySelectorAll('#job-rows tr[data-live]').length};
'''


def run(args, tmp, out_dir):
    key = 'zq-' + secrets.token_hex(16)
    server = Server(args.server, args.worker, tmp, key, out_dir)
    browser = None
    entries = []
    try:
        api = Api(server.http_port, key)
        log(f'zeroq-server: HTTP on port {server.http_port}')
        model_id = api.upload_model(args.model, '1,28,28')
        log(f'model {model_id} is READY')

        browser = Browser(args.chromedriver, args.chromium, tmp / 'chromium', tmp / 'downloads', out_dir)
        url = f'http://127.0.0.1:{server.http_port}/'
        browser.open(url)
        log(f'chromium opened {url}')
        check(browser.js('return typeof window.zeroqDashboard?.refresh') == 'function',
              'the page did not load app.js (window.zeroqDashboard is missing)')
        wait_for('the page to ask for an API key (the server answers 401 without one)',
                 lambda: browser.js("const s = document.querySelector('#status');"
                                    "return !s.hidden && s.textContent.includes('API key');"), 10)

        browser.type('#api-key', key)
        browser.click('#key-use')
        check(browser.js("return sessionStorage.getItem('zeroq.apiKey')") == key,
              'the typed key is not in sessionStorage')
        check(browser.js("return document.querySelector('#api-key').value") == '',
              'the key field still shows the key after use')
        check(browser.js('return localStorage.length') == 0, 'the page wrote to localStorage')
        wait_for('the "no jobs" state after the key is taken',
                 lambda: browser.js("return !document.querySelector('#no-jobs').hidden"
                                    " && document.querySelector('#status').hidden"), 10)

        # The job to watch, submitted while the page is open: it appears by polling.
        config = {'budget': 'MP4', 'activationBits': 8, 'threads': 1,
                  'distillation': {'iterations': args.iterations, 'batchSize': 16},
                  'reconstruction': {'iterations': 20}}
        job_id = api.submit(model_id, config)
        log(f'submitted {job_id}: {json.dumps(config)}')
        wait_for(f'row of {job_id} in the list', lambda: browser.js(ROW_INFO, job_id), 10)
        log(f'{job_id} is listed')

        watch_progress(browser, job_id)

        def ended():
            row = browser.js(ROW_INFO, job_id)
            return row if row and row['state'] in TERMINAL else None
        row = wait_for(f'{job_id} to reach SUCCEEDED in the page', ended, 120, 0.5)
        if row['state'] != 'JOB_SUCCEEDED':
            raise Failure(f'{job_id} ended {row["state"]}: {api.job(job_id).get("error")}')
        check(row['value'] == 1.0, f'a succeeded job shows progress {row["value"]}, not 1')
        log(f'{job_id} SUCCEEDED in the page')

        check_detail(browser, api, job_id)
        check_download(browser, api, job_id, 'recipe.json', tmp / 'downloads')
        size = browser.screenshot(out_dir / 'dashboard.png')
        log(f'screenshot: {out_dir / "dashboard.png"} ({size} bytes)')

        long_id = check_many_jobs(browser, api, model_id)
        check_cancel(browser, long_id)

        browser.click('#key-forget')
        check(browser.js("return sessionStorage.getItem('zeroq.apiKey')") is None,
              '"Forget" left the key in sessionStorage')
        check(browser.js("return document.querySelectorAll('#job-rows tr').length") == 0,
              '"Forget" left jobs on the page')
        log('"Forget" cleared the key and the list')
    except Failure:
        if browser:  # what the page showed when the check failed
            try:
                browser.screenshot(out_dir / 'dashboard-failure.png')
            except (Failure, OSError):
                pass
        raise
    finally:
        if browser:
            entries = browser.console()
            (out_dir / 'browser-console.log').write_text(
                ''.join(f'{e.get("level")} {e.get("source", "")} {e.get("message")}\n' for e in entries))
            browser.close()
        server.stop()
        log(f'stopped the server (exit status {server.proc.returncode})')
    script_errors = [e for e in entries if e.get('source') == 'javascript']
    check(not script_errors, 'the page raised script errors:\n' +
          '\n'.join(e.get('message', '') for e in script_errors))


def watch_progress(browser, job_id):
    """Two readings of the row while the job distils: the second is further on."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        first = browser.js(ROW_INFO, job_id)
        if first['state'] in TERMINAL:
            raise Failure(f'{job_id} ended ({first["state"]}) before its progress could be seen '
                          'advancing: raise --iterations')
        if first['state'] != 'JOB_RUNNING' or first['stage'] != 'STAGE_DISTILL' or first['value'] > 0.8:
            time.sleep(0.1)
            continue
        time.sleep(0.6)
        second = browser.js(ROW_INFO, job_id)
        if second['state'] == 'JOB_RUNNING' and second['stage'] == first['stage']:
            check(second['value'] > first['value'],
                  f'progress of running {job_id} did not advance in 0.6 s: {first} then {second}')
            check(first['live'] and second['live'],
                  f'running {job_id} has no live event stream in the page: {second}')
            log(f'progress of {job_id} advanced live: {first["value"]:.4f} -> {second["value"]:.4f} '
                f'({first["stage"]})')
            return
    raise Failure(f'{job_id} was never seen RUNNING in STAGE_DISTILL below 80 %')


def check_detail(browser, api, job_id):
    job = api.job(job_id)
    result = job.get('result', {})
    frontier, layers = result.get('frontier', []), result.get('layers', [])
    check(len(frontier) >= 5, f'the API returned a frontier of {len(frontier)} points: too few to plot')
    browser.click(f'#job-rows tr[data-job-id="{job_id}"]')

    def rendered():
        d = browser.js(DETAIL_INFO)
        return d if d['points'] and d['layers'] and d['lossPoints'] else None
    detail = wait_for(f'the detail of {job_id} to render', rendered, 10)
    check(job_id in detail['title'], f'the detail pane shows {detail["title"]!r}, not {job_id}')
    check(detail['points'] == len(frontier),
          f'the frontier plot has {detail["points"]} points, the API {len(frontier)}')
    check(detail['chosen'] == 1, f'the frontier plot marks {detail["chosen"]} chosen points, not 1')
    check(len(detail['layers']) == len(layers),
          f'the layer table has {len(detail["layers"])} rows, the API {len(layers)} layers')
    for cells, layer in zip(detail['layers'], layers):
        want = str(layer.get('bits', 0) or 'float')
        check(cells[0] == layer['name'] and cells[-1] == want,
              f'layer row {cells} does not match the API: {layer["name"]} at {want} bits')
    check(detail['stages'] >= 1, 'the stage timings table is empty')
    check(detail['lossPoints'] >= 2, 'the distillation loss chart has no line')
    # An MP4 job leaves the prior's weight unset: the service's default, 10.
    prior = detail['summary'].get('Image prior')
    check(result.get('distillTvWeight') == 10 and prior == 'weight 10',
          f'the image prior shows {prior!r}, the API {result.get("distillTvWeight")!r}, not 10')
    names = [a['name'] for a in result.get('artifacts', [])]
    check(detail['artifacts'] == names, f'artifact buttons {detail["artifacts"]}, the API has {names}')
    check(not detail['error'], f'a succeeded job shows an error: {detail["error"]}')
    log(f'detail: {detail["points"]} frontier points, 1 chosen, {len(layers)} layers, '
        f'{detail["stages"]} stages, loss chart of {detail["lossPoints"]} points, artifacts {names}')


def check_download(browser, api, job_id, name, download_dir):
    """The artifact button saves the same bytes the API serves."""
    want = urllib.request.urlopen(urllib.request.Request(
        f'{api.base}/v1/jobs/{job_id}/artifacts/{name}',
        headers={'Authorization': f'Bearer {api.key}'}), timeout=30).read()
    browser.click(f'#artifacts button.artifact[data-name="{name}"]')
    path = download_dir / name
    wait_for(f'{name} to be downloaded into {download_dir}',
             lambda: path.exists() and path.stat().st_size == len(want), 15)
    check(path.read_bytes() == want, f'the downloaded {name} differs from the API\'s')
    log(f'the {name} button saved the artifact ({len(want)} bytes)')


def check_many_jobs(browser, api, model_id):
    """200 more jobs: one long one to cancel from the page, 199 tiny ones,
    most cancelled at once. Returns the long job's id."""
    long_id = api.submit(model_id, {'weightBits': 8, 'threads': 1,
                                    'distillation': {'iterations': 50000, 'batchSize': 16}})
    tiny = {'weightBits': 8, 'threads': 1, 'distillation': {'iterations': 0}}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: api.submit(model_id, tiny), range(199)))
        list(pool.map(lambda i: api.call('POST', f'/v1/jobs/{i}:cancel'), ids[:-4]))
    log('submitted 200 more jobs, cancelled 195 of them')
    timings = [browser.js(TIMED_REFRESH) for _ in range(3)]
    log('full list refreshes: ' + ', '.join(f'{t["rows"]} rows in {t["ms"]:.0f} ms' for t in timings))
    for t in timings:
        check(t['rows'] == 201 and t['shown'] == 201,
              f'the page lists {t["rows"]} jobs ({t["shown"]} from refresh()), not 201')
        check(t['ms'] < 1000, f'a full refresh of 201 jobs took {t["ms"]:.0f} ms (limit 1000 ms)')
        check(t['live'] <= 4, f'{t["live"]} event streams are open (at most 4: selected + 3 running)')
    return long_id


def check_cancel(browser, job_id):
    wait_for(f'{job_id} to run', lambda: (browser.js(ROW_INFO, job_id) or {}).get('state') == 'JOB_RUNNING', 30)
    browser.click(f'#job-rows tr[data-job-id="{job_id}"]')
    wait_for('the cancel button', lambda: browser.js(
        "const b = document.querySelector('#cancel'); return !b.hidden && !b.disabled"), 10)
    browser.click('#cancel')
    wait_for(f'{job_id} to show CANCELLED',
             lambda: (browser.js(ROW_INFO, job_id) or {}).get('state') == 'JOB_CANCELLED', 20)
    wait_for('the cancel button to go', lambda: browser.js("return document.querySelector('#cancel').hidden"), 10)
    log(f'the cancel button cancelled running {job_id}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--server', required=True, help='zeroq-server binary')
    parser.add_argument('--worker', required=True, help='zeroq-worker binary')
    parser.add_argument('--model', required=True, help='fashion_cnn.pt')
    parser.add_argument('--out', required=True, help='folder for dashboard.png and the logs')
    parser.add_argument('--iterations', type=int, default=2000,
                        help='distillation iterations of the watched job: long enough to watch '
                             '(on one core 400 take about 2 s, 2000 about 11 s)')
    parser.add_argument('--chromium', default='/usr/bin/chromium')
    parser.add_argument('--chromedriver', default='/usr/bin/chromedriver')
    args = parser.parse_args()
    for path in (args.server, args.worker, args.model, args.chromium, args.chromedriver):
        if not os.path.exists(path):
            print(f'FAIL: {path} does not exist', file=sys.stderr)
            return 1
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='zeroq-dashboard-'))
    try:
        run(args, tmp, out_dir)
    except Failure as e:
        print(f'FAIL: {e}\n(logs in {out_dir})', file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log('PASS')
    return 0


if __name__ == '__main__':
    sys.exit(main())
