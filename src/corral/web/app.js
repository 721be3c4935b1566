// The Corral page: start-up, sign-in, routing, the feed, and the new-session dialog.
//
// Start-up asks GET /v1/me. Without tokens configured it answers at once (the local admin);
// with tokens, a 401 opens the token prompt, the token is checked with /v1/me and kept in
// localStorage, and every later request sends it. A 401 later on (a token revoked) opens the
// prompt again.
//
// One feed (GET /v1/feed) keeps the sidebar and the runs view live for every session; only the
// open session has a stream of its own (with token deltas). Routes are hashes, so a reload
// keeps the view: #/s/<session id>, #/agents, #/runs, #/channels.

import {AgentsView} from './agents.js';
import {ChannelsView} from './channels.js';
import {ApiError, auth, get, post} from './api.js';
import {Chat} from './chat.js';
import {h, toast} from './dom.js';
import {RunsView} from './runs.js';
import {Sidebar} from './sidebar.js';
import {SseStream} from './sse.js';

const $ = (selector) => document.querySelector(selector);

// Counters for the benchmark (bench/web.py) and for anyone curious in the console.
const stats = {feedFrames: 0, sessionEvents: 0};
window.corralStats = stats;

const app = {
  me: null,
  feed: null,
  sidebar: null,
  chat: null,
  agents: null,
  runs: null,
  channels: null,
  booted: false,
};

async function main() {
  auth.onUnauthorized = () => askToken();
  bindTokenDialog();
  try {
    app.me = await get('/v1/me');
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return; // the prompt is open
    $('[data-testid="boot-error"]').textContent = `Cannot reach Corral: ${error.message}`;
    $('[data-testid="boot-error"]').hidden = false;
    return;
  }
  boot();
}

function boot() {
  if (app.booted) return;
  app.booted = true;
  document.body.classList.remove('booting');
  $('#app').hidden = false;
  showPrincipal();

  app.sidebar = new Sidebar($('[data-testid="session-list"]'));
  app.chat = new Chat($('[data-view="chat"]'), app.sidebar);
  app.runs = new RunsView($('[data-view="runs"]'), app.sidebar, $('[data-testid="runs-count"]'));
  app.agents = new AgentsView($('[data-view="agents"]'), {
    onChat: (agent) => createSession(agent, ''),
    admin: () => Boolean(app.me && app.me.admin),
  });
  app.channels = new ChannelsView($('[data-view="channels"]'));
  bindSessionDialog();
  $('[data-testid="sign-out"]').addEventListener('click', () => {
    auth.set(null);
    location.reload();
  });

  window.addEventListener('hashchange', route);
  route();
  openFeed(); // its `ready` frame loads the sessions and the runs
}

function openFeed() {
  const status = $('[data-testid="feed-status"]');
  app.feed = new SseStream('/v1/feed', {
    headers: () => auth.headers(),
    resumable: false,
    onEvent: ({event, data}) => {
      stats.feedFrames += 1;
      if (event === 'ready' || event === 'resync') {
        // The feed is attached: read the current state; from here on the feed keeps it current.
        app.sidebar.refresh().catch((error) => toast(error.message));
        app.runs.refreshSoon();
        return;
      }
      app.sidebar.apply(event, data);
      app.runs.onFeed(event);
    },
    onState: (state) => {
      status.dataset.state = state;
      status.textContent = {connecting: 'Connecting…', open: 'Live', reconnecting: 'Reconnecting…',
        closed: 'Offline'}[state];
    },
    onFatal: (error) => toast(error.message),
  }).start();
}

// --- routing ---------------------------------------------------------------------------

function route() {
  const hash = location.hash.replace(/^#\/?/, '');
  const [view, id] = hash.split('/');
  const name = ['agents', 'runs', 'channels'].includes(view) ? view : 'chat';
  for (const section of document.querySelectorAll('[data-view]')) section.hidden = section.dataset.view !== name;
  for (const link of document.querySelectorAll('[data-nav]')) {
    link.classList.toggle('active', link.dataset.nav === name);
  }
  const sessionId = view === 's' && id ? decodeURIComponent(id) : null;
  app.sidebar.select(name === 'chat' ? sessionId : null);
  if (name === 'chat') app.chat.open(sessionId);
  app.agents.show(name === 'agents');
  app.runs.show(name === 'runs');
  app.channels.show(name === 'channels');
  document.title = name === 'chat' ? 'Corral' : `Corral · ${name[0].toUpperCase()}${name.slice(1)}`;
}

// --- sign-in ---------------------------------------------------------------------------

function askToken() {
  const dialog = $('[data-testid="token-prompt"]');
  if (!dialog.open) {
    $('#app').hidden = !app.booted;
    dialog.showModal();
    $('[data-testid="token-input"]').focus();
  }
}

function bindTokenDialog() {
  const dialog = $('[data-testid="token-prompt"]');
  const error = dialog.querySelector('.form-error');
  dialog.addEventListener('cancel', (ev) => ev.preventDefault()); // nothing works without a token
  dialog.querySelector('form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const token = $('[data-testid="token-input"]').value.trim();
    if (!token) return;
    const previous = auth.token;
    auth.set(token);
    try {
      const response = await fetch('/v1/me', {headers: auth.headers(), cache: 'no-store'});
      if (response.status === 401) {
        auth.set(previous);
        error.textContent = 'That token is not valid for this server.';
        error.hidden = false;
        return;
      }
      app.me = await response.json();
    } catch {
      auth.set(previous);
      error.textContent = 'The server cannot be reached.';
      error.hidden = false;
      return;
    }
    error.hidden = true;
    dialog.close();
    if (app.booted) location.reload(); // streams that failed on the old token start over cleanly
    else boot();
  });
}

function showPrincipal() {
  $('[data-testid="principal"]').textContent = app.me.principal;
  $('[data-testid="principal"]').title = app.me.admin ? 'admin' : '';
  $('[data-testid="sign-out"]').hidden = !app.me.auth_required;
}

// --- new session -------------------------------------------------------------------------

function bindSessionDialog() {
  const dialog = $('[data-testid="new-session-dialog"]');
  const select = $('[data-testid="new-session-agent"]');
  $('[data-testid="new-session"]').addEventListener('click', async () => {
    let agents = [];
    try {
      agents = await get('/v1/agents');
    } catch (error) {
      toast(error.message);
      return;
    }
    const current = select.value;
    select.replaceChildren(...agents.map((agent) => h('option', {
      value: agent.name, disabled: agent.state === 'failed', selected: agent.name === current,
    }, agent.state === 'ready' ? agent.name : `${agent.name} (${agent.state})`)));
    $('[data-testid="new-session-key"]').value = '';
    dialog.showModal();
    select.focus();
  });
  dialog.querySelector('[data-action="cancel"]').addEventListener('click', () => dialog.close());
  dialog.querySelector('form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const ok = await createSession(select.value, $('[data-testid="new-session-key"]').value.trim());
    if (ok) dialog.close();
  });
}

async function createSession(agent, key) {
  const body = {agent};
  if (key) body.key = key;
  let session;
  try {
    session = await post('/v1/sessions', body);
  } catch (error) {
    toast(error.message);
    return false;
  }
  app.sidebar.upsert(session, {top: true});
  app.sidebar.flush();
  location.hash = `#/s/${session.id}`;
  return true;
}

main();
