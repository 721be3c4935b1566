// The chat pane of the open session.
//
// Loading, so that a long conversation is cheap to open and a reload never doubles text:
//
// 1. GET /v1/sessions/{id}: `last_event_seq` (L) and the active run, read BEFORE the messages.
// 2. GET /v1/sessions/{id}/messages (and the session's runs, for each run's outcome): everything
//    stored is drawn at once, grouped by run ("history"; no token deltas to replay).
// 3. The session's event stream is followed from F: F = L when the session is idle; when a run
//    is active, F is just before that run's `run.started` (read from the run's own stream), so
//    its deltas so far are replayed and a reload mid-answer shows the whole partial answer.
//
// A run drawn from history whose `run.started` then arrives on the stream is cleared and drawn
// again from its events (the stream holds all of it from there on). A history run that gets
// other events without its `run.started` (it ended between steps 1 and 2) ignores them: its
// stored messages already hold their content. Within the stream every element has a key: user
// bubbles by input id, tool calls by call id, the streaming answer per run (`message.completed`
// replaces its text with the full message, so a resumed stream that missed deltas still ends
// with the exact text), and the SSE reader drops any seq it has already delivered, across
// reconnects too (Last-Event-ID). Nothing else adds text to the transcript.
//
// A message sent from this page shows at once: in its run when it started one, otherwise as a
// chip above the composer (queued, collected, or a steer waiting for the next step) that turns
// into a bubble when its run starts or the steer is delivered.
//
// Rendering cost: events update plain objects at once; bubble text and scrolling are written
// to the DOM once per animation frame, whatever the token rate.

import {ApiError, auth, get, post} from './api.js';
import {frame, h, shortId, summarise, throttle, toast} from './dom.js';
import {firstId, SseStream} from './sse.js';
import {sessionName} from './sidebar.js';

const TERMINAL = new Set(['run.completed', 'run.failed', 'run.cancelled', 'run.interrupted']);
// What a history run already shows when its events turn up without its run.started.
const CONTENT = new Set(['message.delta', 'message.completed', 'tool.started', 'tool.completed', 'run.steered',
  'approval.requested', 'approval.resolved', 'run.waiting', 'subagent.spawned', 'subagent.completed']);
const HISTORY_RUNS = 200;

export class Chat {
  constructor(root, sidebar) {
    this.root = root;
    this.sidebar = sidebar;
    this.el = {
      empty: root.querySelector('[data-testid="chat-empty"]'),
      pane: root.querySelector('.chat'),
      title: root.querySelector('[data-testid="chat-title"]'),
      agent: root.querySelector('[data-testid="chat-agent"]'),
      id: root.querySelector('[data-testid="chat-session-id"]'),
      status: root.querySelector('[data-testid="chat-status"]'),
      queued: root.querySelector('[data-testid="chat-queued"]'),
      stop: root.querySelector('[data-testid="stop"]'),
      transcript: root.querySelector('[data-testid="transcript"]'),
      log: root.querySelector('.transcript-inner'),
      pending: root.querySelector('[data-testid="pending"]'),
      form: root.querySelector('[data-testid="composer"]'),
      input: root.querySelector('[data-testid="composer-input"]'),
      mode: root.querySelector('[data-testid="composer-mode"]'),
      send: root.querySelector('[data-testid="send"]'),
      conn: root.querySelector('[data-testid="stream-status"]'),
    };
    this.s = null;
    this.stick = true;
    this.flush = frame(() => this.paint());
    this.el.transcript.addEventListener('scroll', () => {
      const t = this.el.transcript;
      this.stick = t.scrollHeight - t.scrollTop - t.clientHeight < 80;
    }, {passive: true});
    this.el.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.send();
    });
    this.el.input.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        this.send();
      }
    });
    this.el.input.addEventListener('input', () => this.grow());
    this.el.stop.addEventListener('click', (ev) => this.stop(ev.shiftKey));
    sidebar.subscribe(() => this.header());
  }

  /** Show session `id` (null: the empty state). Reopening the shown session does nothing. */
  open(id) {
    if (this.s && this.s.id === id) return;
    this.close();
    this.el.empty.hidden = id !== null;
    this.el.pane.hidden = id === null;
    if (id === null) return;
    const s = {
      id,
      runs: new Map(), // run id -> {el, body, foot, bubble, calls: Map, status, fromHistory}
      inputs: new Map(), // input id -> its user bubble (inputs and steers)
      runInputs: new Map(), // run id -> input ids, from run.queued
      local: new Map(), // input id -> text this page sent
      pending: new Map(), // input id -> chip element
      active: null,
      softStopped: null,
      dirty: new Set(),
      info: this.sidebar.get(id),
      stream: null,
      ready: false,
      drawn: null, // resolves once the stored history is on screen
    };
    let drawn;
    s.drawn = new Promise((resolve) => { drawn = resolve; });
    s.markDrawn = drawn;
    s.refreshRolledBack = throttle(() => this.markRolledBack(s).catch(() => {}), 300);
    this.s = s;
    this.el.log.replaceChildren();
    this.el.pending.replaceChildren();
    this.el.pane.dataset.loaded = 'false';
    this.stick = true;
    this.header();
    this.start(s);
    this.el.input.focus();
  }

  close() {
    if (this.s && this.s.stream) this.s.stream.close();
    this.s = null;
  }

  async start(s) {
    let from;
    try {
      const info = await get(`/v1/sessions/${s.id}`); // first: its last_event_seq predates the messages
      s.info = info;
      const replayActive = info.active_run_id && ['running', 'waiting'].includes(info.active_status)
        ? firstId(`/v1/runs/${info.active_run_id}/events?after=0`, auth.headers(), 'run.started')
        : Promise.resolve(null);
      const [messages, runs, started] = await Promise.all([
        get(`/v1/sessions/${s.id}/messages`),
        get(`/v1/runs?session_id=${encodeURIComponent(s.id)}&limit=${HISTORY_RUNS}`),
        replayActive,
      ]);
      if (this.s !== s) return;
      this.history(s, messages, new Map(runs.runs.map((run) => [run.id, run])));
      if (!info.active_run_id || !['running', 'waiting'].includes(info.active_status)) from = info.last_event_seq;
      else from = started === null ? 0 : Math.min(started - 1, info.last_event_seq); // 0: replay it all, exact
    } catch (error) {
      if (this.s !== s) return;
      toast(error.message);
      if (error.status === 404) {
        this.el.log.replaceChildren(h('p', {class: 'note note-error'},
          'This session does not exist (or is not yours).'));
        s.markDrawn();
        return;
      }
      from = 0; // the history could not be read: the event log alone rebuilds the conversation
    }
    s.markDrawn();
    if (this.s !== s) return;
    this.header();
    this.flush();
    s.stream = new SseStream(`/v1/sessions/${s.id}/events?after=${from}`, {
      headers: () => auth.headers(),
      resumable: true,
      lastId: from,
      onEvent: (ev) => this.apply(s, ev.event, ev.data),
      onState: (state) => {
        this.el.conn.dataset.state = state;
        this.el.conn.textContent = state === 'reconnecting' ? 'Reconnecting…' : '';
        if (state === 'open' && !s.ready) {
          s.ready = true;
          this.el.pane.dataset.loaded = 'true';
        }
      },
      onFatal: (error) => toast(error.message),
    }).start();
  }

  // --- history ---------------------------------------------------------------------------

  /** Draw the stored conversation, run by run, with each run's outcome. */
  history(s, messages, runs) {
    const byRun = new Map();
    for (const m of messages) {
      if (!byRun.has(m.run_id)) byRun.set(m.run_id, []);
      byRun.get(m.run_id).push(m);
    }
    for (const [runId, list] of byRun) {
      const run = this.run(s, runId);
      run.fromHistory = true;
      let answered = false; // user messages after the run's first answer were steering
      for (const m of list) {
        if (m.role === 'user') {
          run.body.append(userEl(m.content, answered, null));
        } else if (m.role === 'assistant') {
          answered = true;
          if (m.content) run.body.append(assistantEl(m.content, runId).el);
          for (const tc of m.tool_calls || []) {
            const call = this.call(s, runId, {call_id: tc.id, tool: tc.name, arguments: tc.arguments});
            setCall(call, 'requested', 'no result');
          }
        } else if (m.role === 'tool') {
          const call = run.calls.get(m.tool_call_id);
          if (call) showResult(call, m.content, m.content.startsWith('error:'));
        }
      }
      run.el.classList.toggle('rolled-back', list.some((m) => m.rolled_back));
      const info = runs.get(runId);
      if (info) this.outcome(s, run, runId, info.status, info);
    }
  }

  async markRolledBack(s) {
    const messages = await get(`/v1/sessions/${s.id}/messages`);
    const rolled = new Set(messages.filter((m) => m.rolled_back).map((m) => m.run_id));
    for (const [runId, run] of s.runs) run.el.classList.toggle('rolled-back', rolled.has(runId));
  }

  // --- events -------------------------------------------------------------------------

  apply(s, type, d) {
    if (this.s !== s || !d) return;
    if (window.corralStats) window.corralStats.sessionEvents += 1;
    const runId = d.run_id;
    const known = s.runs.get(runId);
    if (known && known.fromHistory) {
      if (type === 'run.started') this.reset(known);
      else if (CONTENT.has(type)) return;
    }
    switch (type) {
      case 'run.queued':
        s.runInputs.set(runId, d.input_ids || []);
        break;
      case 'run.started': {
        const run = this.run(s, runId);
        const ids = d.input_ids || [];
        ids.forEach((inputId, i) => {
          const text = (d.contents || [])[i] ?? s.local.get(inputId) ?? '';
          this.userBubble(s, run, inputId, text, false);
        });
        this.setRunStatus(run, 'running');
        s.active = runId;
        break;
      }
      case 'message.delta': {
        const run = this.run(s, runId);
        if (!run.bubble) run.bubble = this.openBubble(run, runId);
        run.bubble.text += d.text;
        s.dirty.add(run.bubble);
        break;
      }
      case 'message.completed': {
        const run = this.run(s, runId);
        if (!run.bubble && d.content) run.bubble = this.openBubble(run, runId);
        if (run.bubble) {
          run.bubble.text = d.content || '';
          this.closeBubble(s, run);
        }
        for (const tc of d.tool_calls || []) {
          setCall(this.call(s, runId, {call_id: tc.id, tool: tc.name, arguments: tc.arguments}), 'requested', '');
        }
        break;
      }
      case 'tool.started':
        setCall(this.call(s, runId, d), 'running', 'running…');
        break;
      case 'tool.completed':
        showResult(this.call(s, runId, d), d.result, d.is_error);
        break;
      case 'approval.requested': {
        const call = this.call(s, runId, d);
        setCall(call, 'approval', 'needs approval');
        call.approval.replaceChildren(
          h('span', {class: 'approval-q'}, 'Allow this call?'),
          h('button', {class: 'btn btn-primary btn-sm', testid: 'approve', type: 'button',
            onclick: (ev) => this.decide(runId, d.call_id, 'approve', ev.target)}, 'Approve'),
          h('button', {class: 'btn btn-sm', testid: 'deny', type: 'button',
            onclick: (ev) => this.decide(runId, d.call_id, 'deny', ev.target)}, 'Deny'));
        call.approval.hidden = false;
        break;
      }
      case 'approval.resolved': {
        const call = this.call(s, runId, d);
        const decision = d.decision || d.status;
        const approved = decision === 'approve' || decision === 'approved';
        call.el.dataset.decision = approved ? 'approve' : 'deny';
        call.approval.replaceChildren(h('span', {class: `decision decision-${approved ? 'approve' : 'deny'}`,
          testid: 'decision'}, approved ? 'Approved' : 'Denied'));
        call.approval.hidden = false;
        if (approved) setCall(call, 'approved', 'approved');
        else setCall(call, 'denied', 'denied');
        break;
      }
      case 'run.waiting':
        this.setRunStatus(this.run(s, runId), 'waiting');
        break;
      case 'run.steered': {
        const run = this.run(s, runId);
        this.closeBubble(s, run);
        this.userBubble(s, run, d.input_id, d.content, true);
        break;
      }
      case 'input.requeued': {
        const from = s.runs.get(d.from_run_id);
        const ids = d.input_ids || [];
        if (from && !from.fromHistory) {
          from.body.append(h('p', {class: 'note'}, ids.length === 1
            ? 'A message arrived after this run\'s last step; it runs next.'
            : `${ids.length} messages arrived after this run's last step; they run next.`));
        }
        s.runInputs.set(runId, ids);
        for (const inputId of ids) {
          const chip = s.pending.get(inputId);
          if (chip) chip.querySelector('.chip-mode').textContent = 'queued';
        }
        break;
      }
      case 'context.compacted':
        this.el.log.append(h('p', {class: 'note note-divider', testid: 'compacted'},
          `Earlier turns summarised (${d.messages_summarised} messages) to fit the agent's context.`));
        break;
      case 'subagent.spawned':
        this.run(s, runId).body.append(h('p', {class: 'note'}, 'Started a subagent: ',
          h('a', {href: `#/s/${d.child_session_id}`}, summarise(d.task, 80))));
        break;
      case 'subagent.completed':
        this.run(s, runId).body.append(h('p', {class: 'note'}, `A subagent finished (${d.status}): `,
          h('a', {href: `#/s/${d.child_session_id}`}, 'open')));
        break;
      default:
        if (TERMINAL.has(type)) this.ended(s, type, runId, d);
    }
    this.header();
    this.flush();
  }

  ended(s, type, runId, d) {
    const run = s.runs.get(runId);
    if (!run) {
      // A queued run that never started (cancelled while it waited): its messages never ran.
      const ids = s.runInputs.get(runId) || [];
      for (const inputId of ids) this.unpend(s, inputId);
      if (ids.length) {
        this.el.log.append(h('p', {class: 'note', testid: 'run-outcome', dataset: {runId, status: d.status}},
          `${ids.length === 1 ? 'A queued message was' : 'Queued messages were'} cancelled before running.`));
      }
      return;
    }
    this.closeBubble(s, run);
    this.outcome(s, run, runId, d.status || type.slice(4), d);
    if (type === 'run.cancelled' || type === 'run.interrupted') s.refreshRolledBack(); // a rollback marks it
    if (s.active === runId) {
      s.active = null;
      s.softStopped = null;
    }
  }

  /** A run's footer from its status and, once it ended, its usage or error. */
  outcome(s, run, runId, status, d) {
    let text = status;
    if (status === 'completed') {
      const usage = d.usage;
      text = usage ? `Done · ${usage.input_tokens ?? 0} in / ${usage.output_tokens ?? 0} out tokens` : 'Done';
    } else if (status === 'failed') {
      text = `Failed: ${d.error ? d.error.message : 'unknown error'}`;
    } else if (status === 'cancelled') {
      text = `Stopped${d.error && d.error.message ? ` · ${d.error.message}` : ''}`;
    } else if (status === 'interrupted') {
      text = 'Interrupted by a server stop; its messages run again.';
    }
    this.setRunStatus(run, status, text);
  }

  // --- building blocks ------------------------------------------------------------------

  run(s, runId) {
    let run = s.runs.get(runId);
    if (run) return run;
    const body = h('div', {class: 'run-body'});
    const foot = h('div', {class: 'run-foot', testid: 'run-outcome'});
    const el = h('section', {class: 'run', testid: 'run', dataset: {runId}}, body, foot,
      h('span', {class: 'run-rolled', title: 'left out of the model\'s context'}, 'rolled back'));
    this.el.log.append(el);
    run = {el, body, foot, bubble: null, calls: new Map(), status: 'running', fromHistory: false};
    s.runs.set(runId, run);
    return run;
  }

  /** Forget what history drew for a run: its events, from run.started on, draw it again. */
  reset(run) {
    for (const el of run.body.querySelectorAll('[data-input-id]')) this.s.inputs.delete(el.dataset.inputId);
    run.body.replaceChildren();
    run.foot.replaceChildren();
    run.calls.clear();
    run.bubble = null;
    run.fromHistory = false;
  }

  setRunStatus(run, status, text) {
    run.status = status;
    run.el.dataset.status = status;
    run.foot.dataset.status = status;
    if (status === 'running') {
      run.foot.replaceChildren(h('span', {class: 'spinner'}), 'Working…');
    } else if (status === 'waiting') {
      run.foot.replaceChildren(h('span', {class: 'dot dot-waiting'}), 'Waiting for approval');
    } else if (status === 'queued') {
      run.foot.replaceChildren('Queued');
    } else {
      run.foot.replaceChildren(text || status);
    }
  }

  /** The bubble of one input (or steer), once: a replayed or repeated event finds it drawn. */
  userBubble(s, run, inputId, text, steer) {
    if (inputId && s.inputs.has(inputId)) return;
    const el = userEl(text, steer, inputId);
    run.body.append(el);
    if (inputId) s.inputs.set(inputId, el);
    this.unpend(s, inputId);
  }

  openBubble(run, runId) {
    const bubble = assistantEl('', runId);
    bubble.el.classList.add('streaming');
    run.body.append(bubble.el);
    return bubble;
  }

  closeBubble(s, run) {
    if (!run.bubble) return;
    run.bubble.done = true;
    if (!run.bubble.text) run.bubble.el.remove(); // a tool step without text
    else s.dirty.add(run.bubble);
    run.bubble = null;
  }

  call(s, runId, d) {
    const run = this.run(s, runId);
    let call = run.calls.get(d.call_id);
    if (call) return call;
    this.closeBubble(s, run);
    const state = h('span', {class: 'call-state', testid: 'tool-state'});
    const approval = h('div', {class: 'call-approval', testid: 'approval', hidden: true});
    const result = h('pre', {class: 'call-result', testid: 'tool-result', hidden: true});
    const args = d.arguments === undefined ? '' : summarise(d.arguments, 200);
    const el = h('div', {class: 'call', testid: 'tool-call', dataset: {callId: d.call_id, tool: d.tool}},
      h('div', {class: 'call-head'},
        h('span', {class: 'call-icon', 'aria-hidden': 'true'}, '⚙'),
        h('span', {class: 'call-tool'}, d.tool),
        h('code', {class: 'call-args', title: args}, args),
        state),
      approval, result);
    run.body.append(el);
    call = {el, state, approval, result};
    run.calls.set(d.call_id, call);
    return call;
  }

  unpend(s, inputId) {
    const chip = inputId && s.pending.get(inputId);
    if (chip) {
      chip.remove();
      s.pending.delete(inputId);
    }
  }

  // --- actions ----------------------------------------------------------------------------

  async send() {
    const s = this.s;
    const content = this.el.input.value;
    if (!s || !content.trim()) return;
    const mode = this.el.mode.value;
    this.el.input.value = '';
    this.grow();
    this.stick = true;
    await s.drawn; // a message sent while the history loads goes below it
    let accepted;
    try {
      accepted = await post(`/v1/sessions/${s.id}/messages`, {content, mode});
    } catch (error) {
      if (!this.el.input.value) this.el.input.value = content;
      this.grow();
      toast(error.message);
      return;
    }
    this.sidebar.accepted(s.id, accepted.disposition);
    if (this.s !== s) return;
    s.local.set(accepted.input_id, content);
    if (s.inputs.has(accepted.input_id)) return; // its event came first: already drawn
    if (accepted.disposition === 'started') {
      const run = this.run(s, accepted.run_id);
      this.userBubble(s, run, accepted.input_id, content, false);
    } else {
      const label = {steered: 'steer', collected: 'collect', queued: 'queued'}[accepted.disposition] || 'queued';
      const chip = h('div', {class: 'chip', testid: 'pending-input',
        dataset: {inputId: accepted.input_id, disposition: accepted.disposition}},
      h('span', {class: 'chip-mode'}, label), h('span', {class: 'chip-text'}, summarise(content, 120)));
      s.pending.set(accepted.input_id, chip);
      this.el.pending.append(chip);
    }
    this.flush();
  }

  async stop(shift) {
    const s = this.s;
    if (!s || !s.active) return;
    const runId = s.active;
    const hard = shift || s.softStopped === runId;
    try {
      await post(`/v1/runs/${runId}/cancel`, {mode: hard ? 'hard' : 'soft'});
      if (!hard && this.s === s && s.active === runId) {
        s.softStopped = runId;
        this.header();
        toast('Stopping at the next step. Click again to stop at once.', 'info');
      }
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 409)) toast(error.message);
    }
  }

  async decide(runId, callId, decision, button) {
    const buttons = button.parentElement.querySelectorAll('button');
    for (const b of buttons) b.disabled = true;
    try {
      await post(`/v1/runs/${runId}/approvals/${callId}`, {decision});
    } catch (error) {
      for (const b of buttons) b.disabled = false;
      toast(error.message);
    }
  }

  // --- painting -------------------------------------------------------------------------

  header() {
    const s = this.s;
    if (!s) return;
    const info = this.sidebar.get(s.id) || s.info;
    if (info) {
      this.el.title.textContent = sessionName(info);
      this.el.agent.textContent = info.agent;
      this.el.input.placeholder = `Message ${info.agent}…`;
      const queued = info.queued || 0;
      this.el.queued.textContent = `${queued} queued`;
      this.el.queued.hidden = !queued;
    }
    this.el.id.textContent = shortId(s.id);
    this.el.id.title = s.id;
    const run = s.active && s.runs.get(s.active);
    const status = run ? (run.status === 'waiting' ? 'waiting' : 'running') : 'idle';
    this.el.status.textContent = status === 'waiting' ? 'needs approval' : status;
    this.el.status.className = `badge status-${status}`;
    this.el.status.dataset.status = status;
    this.el.stop.hidden = !s.active;
    this.el.stop.dataset.runId = s.active || '';
    const force = s.active && s.softStopped === s.active;
    this.el.stop.textContent = force ? 'Force stop' : 'Stop';
    this.el.stop.dataset.stage = force ? 'hard' : 'soft';
  }

  paint() {
    const s = this.s;
    if (!s) return;
    for (const bubble of s.dirty) {
      bubble.textEl.textContent = bubble.text;
      if (bubble.done) bubble.el.classList.remove('streaming');
    }
    s.dirty.clear();
    if (this.stick) this.el.transcript.scrollTop = this.el.transcript.scrollHeight;
  }

  grow() {
    const input = this.el.input;
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
  }
}

function userEl(text, steer, inputId) {
  return h('div', {class: steer ? 'msg user steer' : 'msg user', testid: steer ? 'steer-message' : 'user-message',
    dataset: inputId ? {inputId} : {}},
  steer ? h('span', {class: 'msg-tag'}, 'steer') : null,
  h('div', {class: 'msg-text'}, text));
}

function assistantEl(text, runId) {
  const textEl = h('div', {class: 'msg-text'}, text);
  const el = h('div', {class: 'msg assistant', testid: 'assistant-message', dataset: {runId}}, textEl);
  return {el, textEl, text, done: !!text};
}

function setCall(call, state, label) {
  call.el.dataset.state = state;
  call.state.textContent = label;
}

function showResult(call, text, isError) {
  if (call.el.dataset.state !== 'denied') setCall(call, isError ? 'error' : 'done', isError ? 'error' : 'done');
  call.result.textContent = text;
  call.result.hidden = false;
}
