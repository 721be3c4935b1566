// The runs view: every run that is queued, running or waiting, across the caller's sessions.
//
// It reads GET /v1/runs?status=queued&status=running&status=waiting when shown and again,
// throttled to once a second, whenever the feed reports a run changing state; rows are keyed
// by run id and only added, updated or removed, never redrawn wholesale. The count of active
// runs in the navigation comes from the same request.

import {get, post} from './api.js';
import {h, relativeTime, shortId, throttle, toast} from './dom.js';
import {sessionName} from './sidebar.js';

const RUN_EVENTS = new Set(['run.queued', 'run.started', 'run.waiting', 'approval.resolved', 'run.completed',
  'run.failed', 'run.cancelled', 'run.interrupted', 'input.requeued']);

export class RunsView {
  constructor(root, sidebar, countEl) {
    this.root = root;
    this.sidebar = sidebar;
    this.countEl = countEl;
    this.body = root.querySelector('[data-testid="run-list"]');
    this.empty = root.querySelector('[data-testid="runs-empty"]');
    this.rows = new Map(); // run id -> {el, key}
    this.visible = false;
    this.stopped = new Set(); // runs soft-stopped from here: the next click is hard
    this.refreshSoon = throttle(() => this.refresh(), 1000);
  }

  show(visible) {
    this.visible = visible;
    if (visible) this.refresh();
  }

  /** A feed frame: refresh (throttled) when a run changed state. */
  onFeed(event) {
    if (RUN_EVENTS.has(event)) this.refreshSoon();
  }

  async refresh() {
    let runs;
    try {
      ({runs} = await get('/v1/runs?status=queued&status=running&status=waiting&limit=500'));
    } catch (error) {
      if (this.visible) toast(error.message);
      return;
    }
    this.countEl.textContent = runs.length ? String(runs.length) : '';
    if (!this.visible) return;
    const seen = new Set();
    let previous = null;
    for (const run of runs) {
      seen.add(run.id);
      const session = this.sidebar.get(run.session_id);
      const name = session ? sessionName(session) : shortId(run.session_id);
      const key = `${run.status}|${name}|${run.started_at}`;
      let row = this.rows.get(run.id);
      if (!row || row.key !== key) {
        const el = this.row(run, name);
        if (row) row.el.replaceWith(el);
        row = {el, key};
        this.rows.set(run.id, row);
      }
      if (row.el.previousElementSibling !== previous || !row.el.isConnected) {
        if (previous) previous.after(row.el);
        else this.body.prepend(row.el);
      }
      previous = row.el;
    }
    for (const [id, row] of this.rows) {
      if (!seen.has(id)) {
        row.el.remove();
        this.rows.delete(id);
        this.stopped.delete(id);
      }
    }
    this.empty.hidden = runs.length > 0;
  }

  row(run, name) {
    const since = run.started_at || run.created_at;
    const stop = h('button', {class: 'btn btn-sm', type: 'button', testid: 'run-stop',
      title: 'Stop at the next step (Shift-click: stop now)'}, this.stopped.has(run.id) ? 'Force stop' : 'Stop');
    stop.addEventListener('click', (ev) => this.stop(run.id, ev.shiftKey, stop));
    return h('tr', {testid: 'run-row', dataset: {runId: run.id, status: run.status}},
      h('td', {class: 'mono', title: run.id}, shortId(run.id)),
      h('td', {}, h('a', {href: `#/s/${run.session_id}`, testid: 'run-session'}, name)),
      h('td', {}, h('span', {class: `badge status-${run.status === 'waiting' ? 'waiting' : run.status}`},
        run.status === 'waiting' ? 'needs approval' : run.status)),
      h('td', {class: 'muted', title: since}, relativeTime(since)),
      h('td', {class: 'cell-actions'}, stop));
  }

  async stop(runId, shift, button) {
    const hard = shift || this.stopped.has(runId);
    try {
      await post(`/v1/runs/${runId}/cancel`, {mode: hard ? 'hard' : 'soft'});
      if (!hard) {
        this.stopped.add(runId);
        button.textContent = 'Force stop';
      }
    } catch (error) {
      if (error.status !== 409) toast(error.message);
    }
    this.refreshSoon();
  }
}
