// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
//
// - Parses the wire format: `id:`, `event:`, `data:` (several data lines join with "\n"),
//   `:` comments (the server's keep-alive pings) ignored, CRLF / LF / CR line ends, and lines
//   split across network chunks.
// - Reconnects after a dropped connection, an end of stream or a silent one (no byte, not even
//   a ping, for `idleMs`; the server pings every 15 s), with exponential backoff and jitter
//   (0.25 s doubling to 8 s; reset once a connection delivers an event).
// - A resumable stream sends `Last-Event-ID` = the last id it delivered, and drops any event
//   whose numeric id is not above it: the server does not resend, but this makes "no event is
//   ever applied twice" a property of the reader, not a hope about the network.
// - 401, 403 and 404 are final (a token or a session that went away): `onFatal` is called and
//   the stream stops; anything else is retried.
// - A handler that throws is reported (window.reportError) and the stream goes on: one bad
//   event must not freeze the page.

import {errorFrom} from './api.js';

const LINE_END = /\r\n|\r|\n/g;

export class SseStream {
  /**
   * @param {string} url
   * @param {object} options
   * @param {() => object} options.headers  extra request headers, read at each (re)connect
   * @param {boolean} options.resumable     send Last-Event-ID and drop already-seen ids
   * @param {number|null} options.lastId   start after this id (resumable streams)
   * @param {(ev: {id: number|null, event: string, data: any}) => void} options.onEvent
   * @param {(state: 'connecting'|'open'|'reconnecting'|'closed') => void} [options.onState]
   * @param {(error: Error) => void} [options.onFatal]
   * @param {number} [options.idleMs]      silence after which the connection counts as dead
   */
  constructor(url, options) {
    this.url = url;
    this.options = {idleMs: 45000, ...options};
    this.lastId = options.lastId ?? null;
    this.closed = false;
    this.controller = null;
    this.connects = 0;
    this.state = null;
  }

  start() {
    this.loop();
    return this;
  }

  close() {
    this.closed = true;
    if (this.controller) this.controller.abort();
    this.setState('closed');
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    if (this.options.onState) this.options.onState(state);
  }

  async loop() {
    let attempt = 0;
    while (!this.closed) {
      this.setState(this.connects === 0 ? 'connecting' : 'reconnecting');
      const controller = new AbortController();
      this.controller = controller;
      try {
        const headers = {...this.options.headers(), Accept: 'text/event-stream'};
        if (this.options.resumable && this.lastId !== null) headers['Last-Event-ID'] = String(this.lastId);
        const response = await fetch(this.url, {headers, signal: controller.signal, cache: 'no-store'});
        if (!response.ok) {
          const error = await errorFrom(response);
          if ([401, 403, 404].includes(response.status)) {
            this.closed = true;
            this.setState('closed');
            if (this.options.onFatal) this.options.onFatal(error);
            return;
          }
        } else {
          this.connects += 1;
          this.setState('open');
          await this.read(response.body, controller, () => { attempt = 0; });
        }
      } catch {
        // the network (a reset, an abort by the idle timer, an unreadable body): try again
      }
      if (this.closed) return;
      this.setState('reconnecting');
      const delay = Math.min(8000, 250 * 2 ** attempt) * (0.75 + Math.random() * 0.5);
      attempt += 1;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }

  async read(body, controller, onData) {
    let idle = null;
    const arm = () => {
      clearTimeout(idle);
      idle = setTimeout(() => controller.abort(), this.options.idleMs);
    };
    arm();
    try {
      for await (const frame of frames(body, arm)) {
        if (this.closed) return;
        if (this.dispatch(frame)) onData();
      }
    } finally {
      clearTimeout(idle);
    }
  }

  /** Deliver one frame; false if it was a duplicate (already delivered). */
  dispatch(frame) {
    let id = null;
    if (frame.id !== null && /^\d+$/.test(frame.id)) {
      id = Number(frame.id);
      if (this.options.resumable && this.lastId !== null && id <= this.lastId) return false;
      this.lastId = id;
    }
    const raw = frame.data.join('\n');
    let data = raw;
    try {
      data = raw ? JSON.parse(raw) : null;
    } catch {
      // not JSON: hand over the text
    }
    try {
      this.options.onEvent({id, event: frame.event || 'message', data});
    } catch (error) {
      reportError(error);
    }
    return true;
  }
}

/**
 * The frames of an SSE body, as {id, event, data: [lines]}; `onChunk` is called for every
 * network chunk (pings included), which is what an idle timer wants to hear about.
 */
export async function* frames(body, onChunk = () => {}) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let frame = {id: null, event: '', data: []};
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      onChunk();
      buffer += value;
      let start = 0;
      LINE_END.lastIndex = 0;
      let match;
      while ((match = LINE_END.exec(buffer)) !== null) {
        // A lone CR at the very end may be the first half of a CRLF still in flight.
        if (match[0] === '\r' && match.index === buffer.length - 1) break;
        const line = buffer.slice(start, match.index);
        start = match.index + match[0].length;
        if (line === '') {
          if (frame.data.length || frame.event) yield frame;
          frame = {id: null, event: '', data: []};
        } else {
          field(frame, line);
        }
      }
      buffer = buffer.slice(start);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function field(frame, line) {
  if (line.startsWith(':')) return; // a comment: the server's keep-alive
  const colon = line.indexOf(':');
  const name = colon === -1 ? line : line.slice(0, colon);
  let value = colon === -1 ? '' : line.slice(colon + 1);
  if (value.startsWith(' ')) value = value.slice(1);
  if (name === 'data') frame.data.push(value);
  else if (name === 'event') frame.event = value;
  else if (name === 'id' && !value.includes('\0')) frame.id = value;
}

/**
 * The id of the first event of type `type` in a stream, then hang up; null if it does not come
 * within `withinMs` (or the request fails). The chat uses it to learn where the open session's
 * active run began, so that it replays exactly that run and reads everything older as stored
 * messages.
 */
export async function firstId(url, headers, type, withinMs = 3000) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), withinMs);
  try {
    const response = await fetch(url, {
      headers: {...headers, Accept: 'text/event-stream'}, signal: controller.signal, cache: 'no-store',
    });
    if (!response.ok) return null;
    for await (const frame of frames(response.body)) {
      if (frame.event === type && frame.id !== null && /^\d+$/.test(frame.id)) return Number(frame.id);
    }
    return null;
  } catch {
    return null;
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}
