// The sidebar's list of sessions, kept live by the one multi-session feed (GET /v1/feed).
//
// State per session is the row GET /v1/sessions returns plus `seq`, the newest event seq this
// row reflects. Feed frames are applied at once to that state (status, active run, queue depth)
// and rows are marked dirty; one animation frame later only the dirty rows are redrawn.
//
// Some inputs change a queue depth without any event (a `collect` joining a waiting run, a
// `steer` waiting in the active run's inbox), so events that move inputs around also schedule
// a reconcile: one throttled GET /v1/sessions for all rows. A reconciled row replaces the local
// state only if it is at least as new (its `last_event_seq` >= the row's seq); feed frames at or
// below a row's seq are already reflected and are skipped. The result: instant updates from the
// feed, exact figures within a second, and a cost of one list request per second under load.

import {get} from './api.js';
import {frame, h, shortId, throttle} from './dom.js';

const LIST_LIMIT = 200;
const TERMINAL = new Set(['run.completed', 'run.failed', 'run.cancelled', 'run.interrupted']);
const RECONCILE = new Set(['run.queued', 'run.started', 'run.steered', 'input.requeued', ...TERMINAL]);

/** What the row shows as the session's state. */
export function statusOf(row) {
  if (!row.active_run_id) return 'idle';
  if (row.active_status === 'waiting') return 'waiting';
  if (row.active_status === 'queued') return 'starting';
  return 'running';
}

export function sessionName(row) {
  return row.title || row.key || `Session ${shortId(row.id)}`;
}

export class Sidebar {
  constructor(listEl, {onChange} = {}) {
    this.listEl = listEl;
    this.rows = new Map(); // id -> {data, el, dirty}
    this.selected = null;
    this.onChange = onChange || (() => {});
    this.dirty = new Set();
    this.flush = frame(() => this.render());
    this.reconcile = throttle(() => this.refresh().catch(() => {}), 1000);
    this.listeners = new Set();
  }

  /** Views that mirror session state (the chat header, the runs view) subscribe here. */
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  get(id) {
    const row = this.rows.get(id);
    return row ? row.data : null;
  }

  async refresh() {
    const list = await get(`/v1/sessions?limit=${LIST_LIMIT}`);
    for (const data of list) this.upsert(data, {fromList: true});
    this.flush();
    if (this.listEl.dataset.loaded !== 'true') this.listEl.dataset.loaded = 'true';
  }

  /** Insert a row, or update one if `data` is at least as new as what the row shows. */
  upsert(data, {fromList = false, top = false} = {}) {
    const existing = this.rows.get(data.id);
    if (!existing) {
      const row = {data: {...data, seq: data.last_event_seq ?? 0, pending: new Set()}, el: null, top};
      this.rows.set(data.id, row);
      this.dirty.add(row);
      return;
    }
    const seq = data.last_event_seq ?? 0;
    const current = existing.data;
    if (fromList && seq < current.seq) {
      // Older than what the feed already told us: keep ours (titles still come through), look again soon.
      if (data.title && data.title !== current.title) {
        current.title = data.title;
        this.dirty.add(existing);
      }
      this.reconcile();
      return;
    }
    const pending = data.active_status === 'waiting' ? current.pending : new Set();
    const next = {...current, ...data, seq: Math.max(seq, current.seq), pending};
    if (!sameView(current, next)) this.dirty.add(existing);
    existing.data = next;
  }

  /** One feed frame: `event` is the type, `data` the event payload (or the session, for session.created). */
  apply(event, data) {
    if (event === 'session.created') {
      // A notice from the moment of creation: a row we already have is newer than it.
      const id = data.id || data.session_id;
      if (!this.rows.has(id)) this.upsert({...data, id}, {top: true});
      this.flush();
      return;
    }
    const row = this.rows.get(data.session_id);
    if (!row) {
      this.reconcile(); // a session older than our list, or one we have not listed yet
      return;
    }
    const s = row.data;
    if (typeof data.seq === 'number') {
      if (data.seq <= s.seq) return;
      s.seq = data.seq;
    }
    const before = viewKey(s);
    const runId = data.run_id;
    switch (event) {
      case 'run.queued':
        s.queued += (data.input_ids || [null]).length;
        break;
      case 'run.started':
        s.active_run_id = runId;
        s.active_status = 'running';
        s.pending = new Set();
        s.queued = Math.max(0, s.queued - (data.input_ids || []).length);
        break;
      case 'run.steered':
        s.queued = Math.max(0, s.queued - 1);
        break;
      case 'run.waiting':
        if (s.active_run_id === runId) s.active_status = 'waiting';
        break;
      case 'approval.requested':
        s.pending.add(data.call_id);
        break;
      case 'approval.resolved':
        s.pending.delete(data.call_id);
        if (s.active_run_id === runId && s.active_status === 'waiting' && s.pending.size === 0) {
          s.active_status = 'running';
        }
        break;
      default:
        if (TERMINAL.has(event)) {
          if (s.active_run_id === runId) {
            s.active_run_id = null;
            s.active_status = null;
            s.pending = new Set();
          }
        } else if (s.active_run_id === runId && s.active_status === 'waiting' && s.pending.size === 0) {
          s.active_status = 'running'; // work after a wait (tool results, messages): it resumed
        }
    }
    if (viewKey(s) !== before) {
      this.dirty.add(row);
      this.flush();
    }
    if (RECONCILE.has(event)) this.reconcile();
  }

  /** A message this page sent was accepted: show its effect at once (the feed may say nothing). */
  accepted(sessionId, disposition) {
    const row = this.rows.get(sessionId);
    if (row && (disposition === 'collected' || disposition === 'steered')) {
      row.data.queued += 1;
      this.dirty.add(row);
      this.flush();
    }
    this.reconcile();
  }

  select(id) {
    if (this.selected === id) return;
    for (const key of [this.selected, id]) {
      const row = key && this.rows.get(key);
      if (row && row.el) row.el.classList.toggle('selected', key === id);
    }
    this.selected = id;
  }

  render() {
    const changed = [];
    for (const row of this.dirty) {
      if (!row.el) {
        row.el = this.build(row);
        if (row.top) this.listEl.prepend(row.el);
        else this.insertSorted(row);
      }
      this.paint(row);
      changed.push(row.data);
    }
    this.dirty.clear();
    this.listEl.dataset.count = String(this.rows.size);
    const empty = this.listEl.parentElement.querySelector('.sessions-empty');
    if (empty) empty.hidden = this.rows.size > 0;
    for (const fn of this.listeners) fn(changed);
  }

  insertSorted(row) {
    // Newest first, like GET /v1/sessions: find the first rendered row that is older.
    const created = row.data.created_at || '';
    for (const el of this.listEl.children) {
      const other = this.rows.get(el.dataset.sessionId);
      if (other && (other.data.created_at || '') < created) {
        this.listEl.insertBefore(row.el, el);
        return;
      }
    }
    this.listEl.append(row.el);
  }

  build(row) {
    const id = row.data.id;
    const el = h('li', {class: 'session-row', testid: 'session-row', dataset: {sessionId: id}},
      h('a', {href: `#/s/${id}`, class: 'session-link', title: id},
        h('span', {class: 'session-name', testid: 'session-name'}),
        h('span', {class: 'session-meta'},
          h('span', {class: 'session-agent'}),
          h('span', {class: 'badge', testid: 'session-status'}),
          h('span', {class: 'badge badge-queue', testid: 'session-queued'}))));
    el.classList.toggle('selected', id === this.selected);
    return el;
  }

  paint(row) {
    const s = row.data;
    const el = row.el;
    const status = statusOf(s);
    el.querySelector('.session-name').textContent = sessionName(s);
    el.querySelector('.session-agent').textContent = s.agent;
    const badge = el.querySelector('[data-testid="session-status"]');
    badge.textContent = status === 'waiting' ? 'needs approval' : status;
    badge.className = `badge status-${status}`;
    badge.dataset.status = status;
    const queue = el.querySelector('[data-testid="session-queued"]');
    queue.textContent = `${s.queued} queued`;
    queue.dataset.queued = String(s.queued);
    queue.hidden = !s.queued;
    el.dataset.status = status;
  }
}

function viewKey(s) {
  return `${statusOf(s)}|${s.queued}|${s.title || ''}|${s.active_run_id || ''}`;
}

function sameView(a, b) {
  return viewKey(a) === viewKey(b) && a.agent === b.agent && a.key === b.key;
}
