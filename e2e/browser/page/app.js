// A small stand-in for seed 000's React frontend: the same calls, in the same shapes, from a page
// served on an origin other than the edge's. Everything it saw is kept in `window.kiln` for the
// test's driver to read.
'use strict';

const params = new URLSearchParams(location.search);
const API = (params.get('api') || 'http://127.0.0.1:8787').replace(/\/$/, '');
// The frontend derives its socket host from the API's unless told otherwise.
const WS = (params.get('ws') || API.replace(/^http/, 'ws')).replace(/\/$/, '');

const kiln = {
  api: API,
  access: null,
  refresh: null,
  user: null,
  jobId: null,
  status: null,
  // Every REST call: method, path, status (0 when the browser refused or the network failed).
  trace: [],
  refreshes: 0,
  socketFrames: [],
  socketOpens: 0,
  socketCloses: [],
  socketErrors: [],
  restMessages: null,
  // Every jobStatus's status, in order; the job, App and tickets as last fetched.
  statuses: [],
  job: null,
  app: null,
  tickets: null,
  dialogue: [],
  errors: [],
  marks: {},
};
window.kiln = kiln;

const $ = (id) => document.getElementById(id);
const t0 = performance.now();
function mark(name) {
  if (!(name in kiln.marks)) kiln.marks[name] = Math.round(performance.now() - t0);
}
function showError(text) {
  kiln.errors.push(text);
  $('error').textContent = text;
}

// A REST call with the access token; a 401 refreshes the tokens once and retries, as the seed's
// frontend does (it needs both `access` and `refresh` back).
async function api(method, path, body, { retry = true, auth = true } = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (auth && kiln.access) headers.Authorization = `Bearer ${kiln.access}`;
  const started = performance.now();
  let resp;
  try {
    resp = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    kiln.trace.push({ method, path, status: 0, error: String(e), ms: Math.round(performance.now() - started) });
    throw new Error(`${method} ${path} did not reach the edge: ${e}`);
  }
  const text = await resp.text();
  const entry = { method, path, status: resp.status, ms: Math.round(performance.now() - started) };
  kiln.trace.push(entry);
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch (e) {
      entry.error = `not JSON: ${text.slice(0, 200)}`;
      throw new Error(`${method} ${path} answered ${resp.status} with a body that is not JSON`);
    }
  } else if (resp.status !== 204) {
    entry.error = 'empty body';
    throw new Error(`${method} ${path} answered ${resp.status} with an empty body`);
  }
  if (resp.status === 401 && auth && retry && kiln.refresh) {
    await refreshTokens();
    return api(method, path, body, { retry: false, auth });
  }
  if (!resp.ok) {
    const detail = data && (data.detail || data.error);
    throw new Error(`${method} ${path} answered ${resp.status}: ${detail}`);
  }
  return data;
}

async function refreshTokens() {
  const data = await api('POST', '/api/auth/token/refresh/', { refresh: kiln.refresh }, { auth: false });
  if (!data || !data.access || !data.refresh) throw new Error('token refresh answered without access and refresh');
  kiln.refreshes += 1;
  kiln.access = data.access;
  kiln.refresh = data.refresh;
}

function signedIn(data) {
  kiln.access = data.access;
  kiln.refresh = data.refresh;
  kiln.user = data.user;
  $('who').textContent = data.user ? data.user.email : '';
}

function credentials() {
  return { email: $('email').value, password: $('password').value };
}

// Seed 000's transcript: REST messages and live stageUpdates, de-duplicated by their timestamp
// (a stageUpdate's `timestamp` equals the stored message's `created_at`).
const rendered = new Map();
function render(msg) {
  const key = `${msg.created_at}|${msg.role}|${msg.content}`;
  if (rendered.has(key)) return;
  const li = document.createElement('li');
  li.dataset.role = msg.role;
  li.dataset.createdAt = msg.created_at;
  li.textContent = `${msg.sender}: ${msg.content}`;
  rendered.set(key, li);
  $('messages').appendChild(li);
}

async function loadMessages() {
  const list = await api('GET', `/api/job-messages/?job_id=${encodeURIComponent(kiln.jobId)}`);
  if (!Array.isArray(list)) throw new Error('GET /api/job-messages/ did not answer a JSON array');
  kiln.restMessages = list;
  $('rest-count').textContent = String(list.length);
  list.forEach(render);
  return list;
}

// Answers can overtake each other: keep only the newest request's.
const latest = {};
async function fetchLatest(key, path) {
  const n = (latest[key] = (latest[key] || 0) + 1);
  const data = await api('GET', path);
  return n === latest[key] ? data : undefined;
}

async function loadJob() {
  const job = await fetchLatest('job', `/api/jobs/${encodeURIComponent(kiln.jobId)}/`);
  if (job !== undefined) kiln.job = job;
}

async function loadApp() {
  const app = await fetchLatest('app', `/api/apps/by-job/${encodeURIComponent(kiln.jobId)}/`);
  if (app !== undefined) kiln.app = app;
}

async function loadTickets() {
  const list = await fetchLatest('tickets', `/api/tickets/?job_id=${encodeURIComponent(kiln.jobId)}`);
  if (list === undefined) return;
  if (!Array.isArray(list)) throw new Error('GET /api/tickets/ did not answer a JSON array');
  kiln.tickets = list;
  $('tickets').replaceChildren(
    ...list.map((t) => {
      const li = document.createElement('li');
      li.dataset.status = t.status;
      li.textContent = `${t.type} ${t.title}: ${t.status}`;
      return li;
    }),
  );
}

let socket = null;
function openSocket() {
  const url = `${WS}/ws/jobs/${encodeURIComponent(kiln.jobId)}/?token=${encodeURIComponent(kiln.access)}`;
  socket = new WebSocket(url);
  socket.onopen = () => {
    kiln.socketOpens += 1;
    mark('socket_open');
    $('socket').textContent = 'open';
    // The seed's frontend loads the whole transcript on every socket open.
    loadMessages().catch((e) => showError(String(e)));
  };
  socket.onmessage = (ev) => {
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch (e) {
      showError(`socket frame is not JSON: ${String(ev.data).slice(0, 200)}`);
      return;
    }
    kiln.socketFrames.push(frame);
    if (frame.kind === 'stageUpdate') {
      render({ role: frame.role, sender: frame.sender, content: frame.content, created_at: frame.timestamp });
      if (frame.role === 'agent') mark('first_agent_reply');
    } else if (frame.kind === 'jobStatus') {
      kiln.status = frame.status;
      kiln.statuses.push(frame.status);
      $('status').textContent = frame.status;
      mark(`status_${frame.status}`);
      // jobStatus is the seed frontend's only trigger to refetch the job (it does not poll); the
      // ticket board is fetched once the backlog is stored, and again at the end.
      loadJob().catch((e) => showError(String(e)));
      if (frame.status === 'tickets_ready' || frame.status === 'build_done') {
        loadTickets().catch((e) => showError(String(e)));
      }
    } else if (frame.kind === 'agentDialogue') {
      kiln.dialogue.push(frame);
      const li = document.createElement('li');
      li.textContent = `${frame.agent}: ${frame.message}`;
      $('dialogue').appendChild(li);
    } else if (frame.kind === 'prdReady') {
      $('prd').textContent = frame.prdMarkdown;
      mark('prd_ready');
      loadApp().catch((e) => showError(String(e)));
    } else if (frame.kind === 'error') {
      // Shown, not a failure of the page: the edge says so before it closes an expired socket.
      kiln.socketErrors.push(frame.message);
      $('error').textContent = `socket: ${frame.message}`;
    }
  };
  socket.onclose = (ev) => {
    kiln.socketCloses.push({ code: ev.code, reason: ev.reason });
    $('socket').textContent = `closed ${ev.code}`;
  };
}

function on(id, handler) {
  $(id).addEventListener('click', () => {
    handler().catch((e) => showError(String(e && e.message ? e.message : e)));
  });
}

on('register', async () => {
  const body = { ...credentials(), name: $('name').value };
  signedIn(await api('POST', '/api/auth/register/', body, { auth: false }));
  mark('registered');
});

on('login', async () => {
  signedIn(await api('POST', '/api/auth/login/', credentials(), { auth: false }));
  mark('logged_in');
});

on('me', async () => {
  const me = await api('GET', '/api/auth/me/');
  $('who').textContent = me.email;
  kiln.me = me;
});

on('create', async () => {
  const job = await api('POST', '/api/jobs/', { prompt: $('prompt').value });
  kiln.jobId = job.id;
  kiln.createdJob = job;
  kiln.status = job.status;
  $('job-id').textContent = job.id;
  $('status').textContent = job.status;
  mark('job_created');
  openSocket();
});

on('reconnect', async () => {
  if (socket && socket.readyState === WebSocket.OPEN) socket.close(1000);
  openSocket();
});

on('send', async () => {
  if (!socket || socket.readyState !== WebSocket.OPEN) throw new Error('the socket is not open');
  socket.send(JSON.stringify({ kind: 'chat', content: $('chat-input').value }));
  mark('chat_sent');
});

on('reload', async () => {
  await loadMessages();
  kiln.reloaded = true;
});
