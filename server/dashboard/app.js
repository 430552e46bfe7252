// app.js: the ZeroQ dashboard. Lists the tenant's jobs (polled every 2.5 s)
// and follows the selected job and up to three running ones live over the
// server-sent event stream (read with fetch, since EventSource cannot send the
// API key). The selected job's detail shows stage timings, the distillation
// loss, the Pareto frontier, the per-layer bits, artifacts and a cancel
// button. Only this server's HTTP API is used; the API key stays in
// sessionStorage. window.zeroqDashboard = {refresh, select} for scripts.
'use strict';

const KEY_STORAGE = 'zeroq.apiKey';
const POLL_MS = 2500;
const PAGE_SIZE = 500;
const MAX_RUNNING_STREAMS = 3;
// Run order (RECONSTRUCT runs before EXPORT although its value is the last).
const STAGES = ['STAGE_INSPECT', 'STAGE_DISTILL', 'STAGE_SENSITIVITY', 'STAGE_PARETO',
  'STAGE_CALIBRATE', 'STAGE_RECONSTRUCT', 'STAGE_EXPORT'];
const TERMINAL = new Set(['JOB_SUCCEEDED', 'JOB_FAILED', 'JOB_CANCELLED']);
const ACTIVE = new Set(['JOB_QUEUED', 'JOB_RUNNING']);
const GRPC_CODES = ['OK', 'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED',
  'NOT_FOUND', 'ALREADY_EXISTS', 'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED',
  'FAILED_PRECONDITION', 'ABORTED', 'OUT_OF_RANGE', 'UNIMPLEMENTED', 'INTERNAL',
  'UNAVAILABLE', 'DATA_LOSS', 'UNAUTHENTICATED'];
const SVG_NS = 'http://www.w3.org/2000/svg';

const $ = (selector) => document.querySelector(selector);

const state = {
  jobs: new Map(),     // id -> Job (list view, kept current by the streams)
  rows: new Map(),     // id -> <tr>
  models: new Map(),   // id -> Model, for names
  modelsAt: 0,         // when the models were last listed (ms)
  streams: new Map(),  // id -> {ctrl: AbortController, seq, done}
  selected: null,      // id of the job in the detail pane
  detail: null,        // its full Job (GET /v1/jobs/{id})
  detailFinal: false,  // ... fetched once the job had ended (with its result)
  detailLoad: null,    // the GET in flight
  loss: [],            // [step, loss] of its distillation, replay and live
  pareto: [],          // its EVENT_PARETO points, until the result has the frontier
  refreshing: null,    // the list refresh in flight
  halted: false,       // no key, or the key was refused: no polling
  drawPending: false,
};

// ------------------------------------------------------------ helpers

const num = (v) => Number(v ?? 0);  // int64 fields arrive as strings, or not at all
const enc = encodeURIComponent;
const label = (value, prefix) => (value ?? '').replace(prefix, '').toLowerCase().replace(/_/g, ' ');
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function fmt(v) {
  if (!Number.isFinite(v)) return '';
  return Math.abs(v) >= 1e5 ? Math.round(v).toLocaleString() : String(Number(v.toPrecision(3)));
}

function fmtBytes(n) {
  if (n < 1024) return `${Math.round(n)} B`;
  if (n < 1024 * 1024) return `${fmt(n / 1024)} KiB`;
  return `${fmt(n / 1024 / 1024)} MiB`;
}

function fmtTime(ts) {
  if (!ts) return '';
  const date = new Date(ts.replace(/(\.\d{3})\d+/, '$1'));
  const time = {hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23'};
  const sameDay = date.toDateString() === new Date().toDateString();
  return date.toLocaleString(undefined, sameDay ? time : {...time, year: 'numeric', month: 'short', day: 'numeric'});
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function errorText(error) {
  if (!error) return '';
  const code = GRPC_CODES[error.code ?? 0] ?? `code ${error.code}`;
  return `${code}: ${error.message ?? ''}`;
}

function showStatus(message, sticky = false) {
  const box = $('#status');
  box.textContent = message;
  box.dataset.sticky = sticky ? '1' : '';
  box.hidden = false;
}

function clearStatus(evenSticky = false) {
  const box = $('#status');
  if (evenSticky || !box.dataset.sticky) box.hidden = true;
}

// ------------------------------------------------------------ the API

const apiKey = () => sessionStorage.getItem(KEY_STORAGE) ?? '';

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? {...extra, Authorization: `Bearer ${key}`} : extra;
}

async function apiError(res) {
  let status = '';
  let message = res.statusText;
  try {
    const {error} = await res.json();
    status = error.status ?? '';
    message = error.message ?? message;
  } catch { /* not JSON */ }
  const err = new Error(`${res.status}${status ? ` ${status}` : ''}: ${message}`);
  err.httpStatus = res.status;
  return err;
}

// fetch, with "Failed to fetch" said plainly.
async function request(path, options) {
  try {
    return await fetch(path, options);
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new Error('the server cannot be reached (retrying)');
  }
}

async function api(path, method = 'GET') {
  const res = await request(path, {method, headers: authHeaders()});
  if (!res.ok) throw await apiError(res);
  return res.json();
}

function reportError(err, what) {
  if (err.httpStatus === 401) {
    halt();
    showStatus(apiKey() ? 'The API key was refused (401). Enter another one above.'
      : 'This server needs an API key: enter it above.');
  } else {
    showStatus(`${what}: ${err.message}`, what !== 'Listing jobs');
  }
}

// ------------------------------------------------------------ the job list

// A full reload of the list; waits for a refresh already in flight, then runs
// its own. Resolves to the number of jobs shown.
function refresh() {
  const run = (state.refreshing ?? Promise.resolve()).catch(() => {}).then(loadJobs);
  const tracked = run.finally(() => {
    if (state.refreshing === tracked) state.refreshing = null;
  });
  state.refreshing = tracked;
  return tracked;
}

async function loadJobs() {
  const query = new URLSearchParams({page_size: String(PAGE_SIZE)});
  const filter = $('#state-filter').value;
  if (filter) query.set('state', filter);
  let page;
  try {
    page = await api(`/v1/jobs?${query}`);
  } catch (err) {
    reportError(err, 'Listing jobs');
    throw err;
  }
  if (state.halted) return 0;
  clearStatus();
  const jobs = (page.jobs ?? []).map((job) => mergeJob(state.jobs.get(job.id), job));
  state.jobs = new Map(jobs.map((job) => [job.id, job]));
  renderRows(jobs);
  setText($('#job-count'), page.nextPageToken ? `newest ${jobs.length}` : `${jobs.length}`);
  updateStreams();
  loadModels(jobs);
  const live = state.jobs.get(state.selected);
  if (live && TERMINAL.has(live.state) && !state.detailFinal) loadDetail(live.id);
  return jobs.length;
}

// A listed job, unless a stream has already shown something newer.
function mergeJob(old, fresh) {
  if (!old || (old.liveSeq ?? 0) <= num(fresh.lastSeq)) return fresh;
  const {state: s, stage, step, total, error, liveSeq} = old;
  return {...fresh, state: s, stage, step, total, error, liveSeq};
}

function renderRows(jobs) {
  const rows = jobs.map((job) => {
    const tr = state.rows.get(job.id) ?? createRow(job.id);
    updateRow(tr, job);
    return tr;
  });
  state.rows = new Map(jobs.map((job, i) => [job.id, rows[i]]));
  const tbody = $('#job-rows');
  const same = tbody.children.length === rows.length &&
    rows.every((tr, i) => tbody.children[i] === tr);
  if (!same) tbody.replaceChildren(...rows);
  $('#no-jobs').hidden = rows.length > 0;
}

function createRow(id) {
  const tr = el('tr', {tabIndex: 0});
  tr.dataset.jobId = id;
  const bar = el('div', {className: 'progress'}, el('span'));
  tr.append(el('td', {className: 'id'}), el('td', {className: 'model'}),
    el('td', {}, el('span', {className: 'badge'})), el('td'), el('td', {}, bar), el('td'));
  tr.classList.toggle('selected', id === state.selected);
  tr.toggleAttribute('data-live', state.streams.has(id));
  return tr;
}

function progressOf(job) {
  const total = num(job.total);
  if (total > 0) return Math.min(1, num(job.step) / total);
  return job.state === 'JOB_SUCCEEDED' ? 1 : 0;
}

function updateRow(tr, job) {
  const [idCell, modelCell, stateCell, stageCell, progressCell, createdCell] = tr.cells;
  setText(idCell, job.id);
  setText(modelCell, modelName(job.modelId));
  modelCell.title = job.modelId ?? '';
  const badge = stateCell.firstChild;
  setText(badge, job.cancelRequested && !TERMINAL.has(job.state) ? 'cancelling' : label(job.state, 'JOB_'));
  badge.className = `badge ${label(job.state, 'JOB_')}`;
  setText(stageCell, label(job.stage, 'STAGE_'));
  const value = progressOf(job);
  const bar = progressCell.firstChild;
  bar.dataset.value = value.toFixed(4);
  bar.firstChild.style.width = `${(value * 100).toFixed(1)}%`;
  bar.title = num(job.total) ? `${num(job.step)} / ${num(job.total)}` : '';
  setText(createdCell, fmtTime(job.createTime));
  tr.dataset.state = job.state ?? '';
  tr.dataset.stage = job.stage ?? '';
}

function modelName(id) {
  return state.models.get(id)?.name || id || '';
}

async function loadModels(jobs) {
  if (!jobs.some((job) => job.modelId && !state.models.has(job.modelId))) return;
  if (Date.now() - state.modelsAt < 10000) return;
  state.modelsAt = Date.now();
  try {
    const page = await api(`/v1/models?page_size=${PAGE_SIZE}`);
    for (const model of page.models ?? []) state.models.set(model.id, model);
  } catch {
    return;  // names are a nicety; ids stay
  }
  for (const [id, tr] of state.rows) updateRow(tr, state.jobs.get(id));
  if (state.detail) renderLive();
}

// ------------------------------------------------------------ event streams

// The selected job and the newest running ones stream; nothing else does
// (a browser opens only ~6 connections to a host).
function updateStreams() {
  const wanted = new Set(state.selected ? [state.selected] : []);
  let running = 0;
  for (const job of state.jobs.values()) {
    if (running === MAX_RUNNING_STREAMS) break;
    if (job.state === 'JOB_RUNNING' && job.id !== state.selected) {
      wanted.add(job.id);
      running++;
    }
  }
  for (const [id, stream] of state.streams) {
    if (!wanted.has(id)) closeStream(id, stream);
  }
  for (const id of wanted) {
    if (!state.streams.has(id)) openStream(id, num(state.jobs.get(id)?.lastSeq));
  }
}

function openStream(id, afterSeq) {
  const stream = {ctrl: new AbortController(), seq: afterSeq, done: false};
  state.streams.set(id, stream);
  state.rows.get(id)?.toggleAttribute('data-live', true);
  runStream(id, stream);
}

function closeStream(id, stream) {
  stream.ctrl.abort();
  if (state.streams.get(id) === stream) state.streams.delete(id);
  state.rows.get(id)?.toggleAttribute('data-live', false);
}

async function runStream(id, stream) {
  let delay = 1000;
  while (!stream.ctrl.signal.aborted && !stream.done) {
    try {
      const headers = authHeaders({Accept: 'text/event-stream'});
      if (stream.seq > 0) headers['Last-Event-ID'] = String(stream.seq);
      const res = await request(`/v1/jobs/${enc(id)}/events`, {headers, signal: stream.ctrl.signal});
      if (!res.ok) {
        const err = await apiError(res);
        if (err.httpStatus < 500) {  // unknown job, bad key: retrying will not help
          stream.done = true;
          if (id === state.selected) reportError(err, `Following ${id}`);
          break;
        }
        throw err;
      }
      delay = 1000;
      await readEvents(res.body, (event) => onStreamEvent(id, stream, event));
    } catch (err) {
      if (stream.ctrl.signal.aborted) return;
      console.warn(`event stream of ${id}:`, err);
    }
    if (!stream.done) await sleep(delay);
    delay = Math.min(delay * 2, 10000);
  }
  if (state.streams.get(id) === stream) state.rows.get(id)?.toggleAttribute('data-live', false);
}

// Server-sent events: "field: value" lines, a blank line ends an event,
// ":" starts a comment (heartbeats). onEvent returns true to stop reading.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = {id: '', type: 'message', data: []};
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      const lines = (buffer + value).split('\n');
      buffer = lines.pop();
      for (let line of lines) {
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (line === '') {
          if (event.data.length && onEvent({...event, data: event.data.join('\n')})) return;
          event = {id: '', type: 'message', data: []};
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'id') event.id = val;
        else if (field === 'event') event.type = val;
        else if (field === 'data') event.data.push(val);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function onStreamEvent(id, stream, {id: seq, type, data}) {
  if (seq) stream.seq = Number(seq);
  let payload;
  try {
    payload = JSON.parse(data);
  } catch {
    return false;
  }
  if (type === 'end') {
    stream.done = true;
    if (id === state.selected && !state.detailFinal) loadDetail(id);
    return true;
  }
  if (type === 'error') {  // e.g. the server is stopping: reconnect later
    if (id === state.selected) showStatus(`Live updates paused: ${payload.error?.message ?? ''}`);
    return true;
  }
  for (const job of new Set([state.jobs.get(id), state.detail?.id === id ? state.detail : null])) {
    if (job) applyEvent(job, payload);
  }
  const tr = state.rows.get(id);
  if (tr && state.jobs.has(id)) updateRow(tr, state.jobs.get(id));
  if (id === state.selected) collectForDetail(payload);
  return false;
}

// An event newer than what the job already shows moves it on.
function applyEvent(job, event) {
  const seq = num(event.seq);
  if (seq <= Math.max(num(job.lastSeq), job.liveSeq ?? 0)) return;
  job.liveSeq = seq;
  if (event.stage && event.stage !== job.stage) {
    job.stage = event.stage;
    job.step = job.total = '0';
  }
  if (event.type === 'EVENT_STATE' && event.state) {
    job.state = event.state;
    if (event.error) job.error = event.error;
  } else if (event.type === 'EVENT_PROGRESS') {
    job.step = event.step;
    job.total = event.total;
  }
}

function collectForDetail(event) {
  if (event.type === 'EVENT_PROGRESS' && event.stage === 'STAGE_DISTILL' && event.loss !== undefined) {
    state.loss.push([num(event.step), event.loss]);
  } else if (event.type === 'EVENT_PARETO') {
    state.pareto.push({size: num(event.sizeBits), sens: event.omega ?? 0, chosen: !!event.chosen});
  } else if (event.message) {
    setText($('#detail-message'), event.message);
  }
  scheduleDraw();
}

// ------------------------------------------------------------ the detail pane

async function select(id) {
  if (!id) return;
  const old = state.streams.get(id);
  if (old) closeStream(id, old);
  state.selected = id;
  state.detail = null;
  state.detailFinal = false;
  state.loss = [];
  state.pareto = [];
  for (const [rowId, tr] of state.rows) tr.classList.toggle('selected', rowId === id);
  history.replaceState(null, '', `#${enc(id)}`);
  $('#detail').hidden = false;
  setText($('#detail-title'), `Job ${id}`);
  setText($('#detail-message'), '');
  for (const box of ['#result-summary', '#artifacts', '#stages tbody', '#loss', '#frontier', '#layers tbody']) {
    $(box).replaceChildren();
  }
  openStream(id, 0);  // from the first event: the loss chart needs them all
  updateStreams();
  await loadDetail(id);
}

function loadDetail(id) {
  if (state.detailLoad?.id === id) return state.detailLoad.promise;
  const promise = (async () => {
    try {
      const job = await api(`/v1/jobs/${enc(id)}`);
      if (state.selected !== id) return;
      state.detailFinal = TERMINAL.has(job.state);
      const live = state.jobs.get(id);
      if (live && (live.liveSeq ?? 0) > num(job.lastSeq)) Object.assign(job, mergeJob(live, job));
      state.detail = job;
      renderDetail();
    } catch (err) {
      if (state.selected !== id) return;
      const box = $('#detail-error');
      box.textContent = `Could not load ${id}: ${err.message}`;
      box.hidden = false;
      if (err.httpStatus === 401) reportError(err, 'Loading the job');
    } finally {
      if (state.detailLoad?.promise === promise) state.detailLoad = null;
    }
  })();
  state.detailLoad = {id, promise};
  return promise;
}

function renderDetail() {
  const result = state.detail?.result;
  renderLive();
  renderSummary(result);
  renderArtifacts(result);
  renderStages(result);
  renderLayers(result);
  drawLoss();
  drawFrontier(result);
}

// The parts that move while the job runs.
function renderLive() {
  const job = state.detail;
  if (!job) return;
  $('#detail-message').hidden = TERMINAL.has(job.state);
  const errorBox = $('#detail-error');
  errorBox.textContent = errorText(job.error);
  errorBox.hidden = !job.error;
  const cancel = $('#cancel');
  cancel.hidden = !ACTIVE.has(job.state);
  cancel.disabled = !!job.cancelRequested;
  cancel.textContent = job.cancelRequested ? 'Cancelling…' : 'Cancel job';
  const c = job.config ?? {};
  const progress = num(job.total) ? ` ${num(job.step)} / ${num(job.total)}` : '';
  const attempts = (job.attemptHistory ?? []).map((a) =>
    `#${a.number ?? '?'} ${a.device ?? ''} ${a.outcome ?? ''}${a.reason ? `: ${a.reason}` : ''}`);
  fillList($('#detail-meta'), [
    ['Model', `${modelName(job.modelId)}${state.models.has(job.modelId) ? ` (${job.modelId})` : ''}`],
    ['State', label(job.state, 'JOB_') + (job.cancelRequested && !TERMINAL.has(job.state) ? ' (cancel requested)' : '')],
    ['Stage', label(job.stage, 'STAGE_') + progress],
    ['Precision', c.budget ? `mixed, budget ${c.budget}` : `W${c.weightBits ?? 8}`],
    ['Activations', c.activationBits === 0 ? 'float' : `A${c.activationBits ?? 8}`],
    ['Device', job.device ?? ''],
    ['Created', fmtTime(job.createTime)],
    ['Started', fmtTime(job.startTime)],
    ['Ended', fmtTime(job.endTime)],
    ['Attempts', attempts.length > 1 || attempts.some((a) => a.includes(':')) ? attempts.join('; ') : ''],
    ['Config', flatten(c).join(', ')],
  ]);
}

// {"a": 1, "b": {"c": 2}} -> ["a 1", "b.c 2"]
function flatten(value, prefix = '') {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    return [`${prefix} ${Array.isArray(value) ? value.join(',') : value}`];
  }
  return Object.entries(value).flatMap(([k, v]) => flatten(v, prefix ? `${prefix}.${k}` : k));
}

function fillList(dl, pairs) {
  const items = [];
  for (const [term, value] of pairs) {
    if (value) items.push(el('dt', {textContent: term}), el('dd', {textContent: value}));
  }
  dl.replaceChildren(...items);
}

function renderSummary(result) {
  if (!result) {
    const ended = TERMINAL.has(state.detail?.state);
    fillList($('#result-summary'), [['Result', ended ? 'none' : 'when the job succeeds']]);
    return;
  }
  const weights = num(result.weightBytes);
  const float = num(result.floatWeightBytes);
  const prior = num(result.distillTvWeight);  // JSON leaves out a 0 weight: off
  fillList($('#result-summary'), [
    ['Weights', float ? `${fmtBytes(weights)} of ${fmtBytes(float)} in float (${fmt(float / weights)}× smaller)` : ''],
    ['Top-1 agreement', result.top1Agreement !== undefined ? `${(result.top1Agreement * 100).toFixed(2)} %` : ''],
    ['Mean KL', result.meanKl !== undefined ? fmt(result.meanKl) : ''],
    ['Distillation loss', result.distillInitialLoss !== undefined
      ? `${fmt(result.distillInitialLoss)} → ${fmt(result.distillFinalLoss ?? 0)}` : ''],
    ['Image prior', result.distillInitialLoss !== undefined
      ? (prior ? `weight ${fmt(prior)}` : 'off') : ''],
    ['Ran on', [result.device, result.threads && `${result.threads} thread${result.threads > 1 ? 's' : ''}`]
      .filter(Boolean).join(', ')],
  ]);
}

function renderArtifacts(result) {
  const id = state.selected;
  const buttons = (result?.artifacts ?? []).map((artifact) => {
    const button = el('button', {type: 'button', className: 'artifact',
      textContent: `⤓ ${artifact.name} (${fmtBytes(num(artifact.sizeBytes))})`,
      title: `SHA-256 ${artifact.sha256 ?? ''}`});
    button.dataset.name = artifact.name;
    button.addEventListener('click', () => download(id, artifact.name, button));
    return button;
  });
  $('#artifacts').replaceChildren(...buttons);
}

async function download(id, name, button) {
  button.disabled = true;
  try {
    const res = await request(`/v1/jobs/${enc(id)}/artifacts/${enc(name)}`, {headers: authHeaders()});
    if (!res.ok) throw await apiError(res);
    const url = URL.createObjectURL(await res.blob());
    const link = el('a', {href: url, download: name});
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (err) {
    showStatus(`Downloading ${name}: ${err.message}`, true);
  } finally {
    button.disabled = false;
  }
}

function renderStages(result) {
  const order = (s) => STAGES.indexOf(s.stage);
  const stages = [...(result?.stageSeconds ?? [])].sort((a, b) => order(a) - order(b));
  const longest = Math.max(1e-9, ...stages.map((s) => s.seconds ?? 0));
  $('#stages tbody').replaceChildren(...stages.map((s) => {
    const bar = el('div', {className: 'bar'});
    bar.style.width = `${((s.seconds ?? 0) / longest) * 100}%`;
    return el('tr', {}, el('td', {textContent: label(s.stage, 'STAGE_')}),
      el('td', {className: 'num', textContent: (s.seconds ?? 0).toFixed(3)}), el('td', {className: 'bar-cell'}, bar));
  }));
}

function renderLayers(result) {
  $('#layers tbody').replaceChildren(...(result?.layers ?? []).map((layer) => {
    const bits = layer.bits ?? 0;
    const badge = el('span', {className: `bits bits-${bits}`, textContent: bits ? String(bits) : 'float'});
    return el('tr', {}, el('td', {textContent: layer.name, title: layer.op ?? ''}),
      el('td', {className: 'num', textContent: num(layer.params).toLocaleString()}),
      el('td', {className: 'num'}, badge));
  }));
}

function scheduleDraw() {
  if (state.drawPending) return;
  state.drawPending = true;
  requestAnimationFrame(() => {
    state.drawPending = false;
    renderLive();
    drawLoss();
    if (!state.detail?.result?.frontier) drawFrontier(null);
  });
}

async function cancelSelected() {
  const id = state.selected;
  $('#cancel').disabled = true;
  try {
    const job = await api(`/v1/jobs/${enc(id)}:cancel`, 'POST');
    if (state.selected === id) {
      state.detail = mergeJob(state.detail, job);
      renderLive();
    }
    await refresh();
  } catch (err) {
    showStatus(`Cancelling ${id}: ${err.message}`, true);
    $('#cancel').disabled = false;
  }
}

// ------------------------------------------------------------ charts (inline SVG)

const W = 440;
const H = 250;
const M = {left: 52, right: 12, top: 10, bottom: 38};

function svg(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  parent?.append(node);
  return node;
}

function niceStep(span, count) {
  const raw = span / count;
  const pow = 10 ** Math.floor(Math.log10(raw));
  const m = raw / pow;
  return (m < 1.5 ? 1 : m < 3 ? 2 : m < 7 ? 5 : 10) * pow;
}

// Linear, or log10 when the positive values span a decade or more.
function makeScale(values, allowLog) {
  const positive = values.filter((v) => v > 0);
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  const log = allowLog && positive.length > 1 && Math.max(...positive) / Math.min(...positive) >= 10;
  if (log) {
    lo = Math.min(...positive);
    const f = (v) => Math.log10(Math.max(v, lo));
    const decades = Math.log10(hi / lo);
    const ticks = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      for (const m of decades > 2.5 ? [1] : [1, 2, 5]) ticks.push(m * 10 ** e);
    }
    return {log, pos: (v) => (f(v) - f(lo)) / (f(hi) - f(lo)), ticks: ticks.filter((t) => t >= lo && t <= hi)};
  }
  if (lo === hi) {
    const pad = Math.abs(lo) * 0.1 || 1;
    lo -= pad;
    hi += pad;
  }
  const step = niceStep(hi - lo, 5);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return {log, pos: (v) => (v - lo) / (hi - lo), ticks};
}

// Axes, grid and labels in a new <svg> put into box; returns the pixel maps.
function plotFrame(box, xs, ys, {xLabel, yLabel, logY}) {
  const sx = makeScale(xs, false);
  const sy = makeScale(ys, logY);
  const pw = W - M.left - M.right;
  const ph = H - M.top - M.bottom;
  const X = (v) => M.left + (0.03 + 0.94 * sx.pos(v)) * pw;  // a margin inside the frame
  const Y = (v) => M.top + (0.97 - 0.94 * sy.pos(v)) * ph;
  const root = svg('svg', {viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${yLabel} by ${xLabel}`});
  root.dataset.logY = String(sy.log);
  const axes = svg('g', {class: 'axes'}, root);
  for (const t of sx.ticks) {
    svg('line', {class: 'grid', x1: X(t), x2: X(t), y1: M.top, y2: M.top + ph}, axes);
    svg('text', {x: X(t), y: M.top + ph + 15, 'text-anchor': 'middle'}, axes).textContent = fmt(t);
  }
  for (const t of sy.ticks) {
    svg('line', {class: 'grid', x1: M.left, x2: M.left + pw, y1: Y(t), y2: Y(t)}, axes);
    svg('text', {x: M.left - 5, y: Y(t) + 4, 'text-anchor': 'end'}, axes).textContent = fmt(t);
  }
  svg('rect', {class: 'frame', x: M.left, y: M.top, width: pw, height: ph}, axes);
  svg('text', {class: 'label', x: M.left + pw / 2, y: H - 4, 'text-anchor': 'middle'}, axes).textContent = xLabel;
  svg('text', {class: 'label', transform: `translate(13 ${M.top + ph / 2}) rotate(-90)`, 'text-anchor': 'middle'}, axes)
    .textContent = yLabel + (sy.log ? ' (log)' : '');
  box.replaceChildren(root);
  return {root, X, Y};
}

function note(box, text) {
  box.replaceChildren(el('p', {className: 'note', textContent: text}));
}

function drawLoss() {
  const box = $('#loss');
  const points = state.loss;
  if (points.length < 2) {
    const job = state.detail;
    note(box, job?.config?.distillation?.iterations === 0 || job?.config?.calibration === 'CALIBRATION_GAUSSIAN'
      ? 'No distillation in this job.' : 'No distillation progress yet.');
    return;
  }
  const {root, X, Y} = plotFrame(box, points.map((p) => p[0]), points.map((p) => p[1]),
    {xLabel: 'iteration', yLabel: 'loss', logY: true});
  svg('polyline', {class: 'line', points: points.map(([s, l]) => `${X(s).toFixed(1)},${Y(l).toFixed(1)}`).join(' ')}, root);
}

function drawFrontier(result) {
  const box = $('#frontier');
  const point = (p) => ({size: num(p.sizeBits), sens: p.sensitivity ?? 0, bits: p.bits ?? []});
  let points = (result?.frontier ?? []).map(point);
  let chosen = result?.chosen ? point(result.chosen) : null;
  if (!points.length && !result) {  // still running: the points streamed so far
    points = state.pareto;
    chosen = state.pareto.findLast((p) => p.chosen) ?? null;
  }
  if (!points.length) {
    note(box, result ? 'No frontier: this job used uniform precision.' : 'Not computed yet.');
    return;
  }
  const all = chosen ? [...points, chosen] : points;
  const kib = (bits) => bits / 8 / 1024;
  const {root, X, Y} = plotFrame(box, all.map((p) => kib(p.size)), all.map((p) => p.sens),
    {xLabel: 'weight size (KiB)', yLabel: 'total sensitivity Ω', logY: true});
  const sorted = [...points].sort((a, b) => a.size - b.size);
  svg('polyline', {class: 'frontier-line', points: sorted.map((p) => `${X(kib(p.size)).toFixed(1)},${Y(p.sens).toFixed(1)}`).join(' ')}, root);
  const tip = (p) => `${fmt(kib(p.size))} KiB, Ω ${fmt(p.sens)}${p.bits?.length ? `, bits ${p.bits.join(' ')}` : ''}`;
  for (const p of points) {
    const dot = svg('circle', {class: 'point', cx: X(kib(p.size)), cy: Y(p.sens), r: 3.5}, root);
    svg('title', {}, dot).textContent = tip(p);
  }
  if (chosen) {
    const mark = svg('circle', {class: 'chosen', cx: X(kib(chosen.size)), cy: Y(chosen.sens), r: 7}, root);
    svg('title', {}, mark).textContent = `chosen: ${tip(chosen)}`;
  }
}

// ------------------------------------------------------------ start, key

function halt() {
  state.halted = true;
  for (const [id, stream] of state.streams) closeStream(id, stream);
  state.jobs.clear();
  state.rows.clear();
  state.selected = state.detail = null;
  $('#job-rows').replaceChildren();
  $('#no-jobs').hidden = false;
  $('#detail').hidden = true;
  setText($('#job-count'), '');
  updateKeyUi();
}

function start() {
  state.halted = false;
  clearStatus(true);
  updateKeyUi();
  refresh().then(() => {
    const id = decodeURIComponent(location.hash.slice(1));
    if (id && !state.selected) select(id);
  }).catch(() => {});
}

function updateKeyUi() {
  const input = $('#api-key');
  input.placeholder = apiKey() ? 'set for this tab' : 'not set';
  $('#key-forget').disabled = !apiKey();
}

function init() {
  $('#key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const key = $('#api-key').value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $('#api-key').value = '';
    halt();
    start();
  });
  $('#key-forget').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORAGE);
    halt();
    showStatus('The API key is forgotten. Enter one to see your jobs.');
  });
  $('#job-rows').addEventListener('click', (e) => {
    const tr = e.target.closest('tr[data-job-id]');
    if (tr) select(tr.dataset.jobId);
  });
  $('#job-rows').addEventListener('keydown', (e) => {
    const tr = e.target.closest('tr[data-job-id]');
    if (tr && e.key === 'Enter') select(tr.dataset.jobId);
  });
  $('#state-filter').addEventListener('change', () => refresh().catch(() => {}));
  $('#refresh').addEventListener('click', () => refresh().catch(() => {}));
  $('#cancel').addEventListener('click', cancelSelected);
  $('#status').addEventListener('click', () => clearStatus(true));
  setInterval(() => {
    if (!state.halted && !state.refreshing && !document.hidden) refresh().catch(() => {});
  }, POLL_MS);
  window.zeroqDashboard = Object.freeze({refresh, select});
  start();
}

init();
