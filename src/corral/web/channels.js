// The channels view (admins): every chat channel with its state (starting, running, backing off,
// failed), its last error, its chats and messages, its outbox, and a Restart button.
//
// Channels send no feed events, so the view reads GET /v1/channels when shown and every
// POLL_MS while it stays shown; rows are keyed by channel name and redrawn only when they change.

import {get, post} from './api.js';
import {h, toast} from './dom.js';

const POLL_MS = 2000;
const STATE_LABEL = {starting: 'starting', running: 'running', backing_off: 'backing off', failed: 'failed',
  stopped: 'stopped'};
const STATE_CLASS = {starting: 'state-starting', running: 'state-ready', backing_off: 'status-waiting',
  failed: 'state-failed', stopped: 'status-queued'};

export class ChannelsView {
  constructor(root) {
    this.root = root;
    this.body = root.querySelector('[data-testid="channel-list"]');
    this.empty = root.querySelector('[data-testid="channels-empty"]');
    this.rows = new Map(); // name -> {el, key}
    this.visible = false;
    this.timer = null;
  }

  show(visible) {
    this.visible = visible;
    clearTimeout(this.timer);
    if (visible) this.refresh();
  }

  async refresh() {
    clearTimeout(this.timer);
    let channels;
    try {
      ({channels} = await get('/v1/channels'));
    } catch (error) {
      if (this.visible) {
        this.empty.textContent = error.status === 403 ? 'Channels are for admins.' : error.message;
        this.empty.hidden = false;
      }
      return;
    }
    if (!this.visible) return;
    const seen = new Set();
    let previous = null;
    for (const channel of channels) {
      seen.add(channel.name);
      const key = JSON.stringify(channel);
      let row = this.rows.get(channel.name);
      if (!row || row.key !== key) {
        const el = this.row(channel);
        if (row) row.el.replaceWith(el);
        row = {el, key};
        this.rows.set(channel.name, row);
      }
      if (row.el.previousElementSibling !== previous || !row.el.isConnected) {
        if (previous) previous.after(row.el);
        else this.body.prepend(row.el);
      }
      previous = row.el;
    }
    for (const [name, row] of this.rows) {
      if (!seen.has(name)) {
        row.el.remove();
        this.rows.delete(name);
      }
    }
    this.empty.textContent = 'No channels: add [[channels]] to corral.toml (docs/channels.md).';
    this.empty.hidden = channels.length > 0;
    this.timer = setTimeout(() => this.refresh(), POLL_MS);
  }

  row(channel) {
    const restart = h('button', {class: 'btn btn-sm', type: 'button', testid: 'channel-restart'}, 'Restart');
    restart.addEventListener('click', () => this.restart(channel.name, restart));
    const outbox = channel.outbox;
    const problem = channel.last_error
      ? h('div', {class: 'muted channel-error', testid: 'channel-error', title: channel.last_error},
        channel.last_error + (channel.next_attempt_at ? ` · next try ${untilTime(channel.next_attempt_at)}` : ''))
      : null;
    return h('tr', {testid: 'channel-row', dataset: {name: channel.name, state: channel.state}},
      h('td', {}, h('strong', {}, channel.name), h('div', {class: 'muted'}, `${channel.kind} · ${channel.transport}`
        + ` → ${channel.agent}`)),
      h('td', {}, h('span', {class: `badge ${STATE_CLASS[channel.state] || ''}`, testid: 'channel-state'},
        STATE_LABEL[channel.state] || channel.state), problem),
      h('td', {class: 'num'}, String(channel.chats)),
      h('td', {class: 'num', title: `refused ${channel.refused}, duplicates ${channel.duplicates}`},
        `${channel.messages_in} / ${channel.messages_out}`),
      h('td', {class: 'num', testid: 'channel-outbox',
        title: `retries ${outbox.retries}, rate-limited ${outbox.rate_limited}, sent ${outbox.sent}`},
      `${outbox.depth} waiting` + (outbox.failed ? ` · ${outbox.failed} failed` : '')),
      h('td', {class: 'cell-actions'}, restart));
  }

  async restart(name, button) {
    button.disabled = true;
    try {
      await post(`/v1/channels/${encodeURIComponent(name)}/restart`, {});
    } catch (error) {
      toast(error.message);
    }
    button.disabled = false;
    this.refresh();
  }
}

function untilTime(iso) {
  const seconds = Math.round((Date.parse(iso) - Date.now()) / 1000);
  if (seconds <= 1) return 'now';
  return seconds < 90 ? `in ${seconds} s` : `in ${Math.round(seconds / 60)} min`;
}
