// Small DOM helpers shared by the views: element building, per-frame batching, toasts, formatting.
//
// Every view keeps its state in plain objects and touches the DOM only for what changed; the
// `frame` helper coalesces many updates (a burst of feed events, a stream of token deltas) into
// one pass per animation frame, so fifty busy sessions cost one layout per frame, not fifty.

/** Build an element: h('div', {class: 'x', testid: 'y', onclick: fn}, child, 'text', ...). */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'testid') el.dataset.testid = value;
    else if (key === 'text') el.textContent = value;
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key in el && typeof value !== 'string') el[key] = value;
    else el.setAttribute(key, value === true ? '' : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** Run `fn` once on the next animation frame however often `schedule()` is called before it. */
export function frame(fn) {
  let pending = false;
  return function schedule() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      fn();
    });
  };
}

/** Call `fn` at most once per `ms` (leading and trailing), for refetches triggered by bursts. */
export function throttle(fn, ms) {
  let last = 0;
  let timer = null;
  return function run() {
    if (timer !== null) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(() => {
      timer = null;
      last = Date.now();
      fn();
    }, wait);
  };
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

let toastHost = null;

/** A small message at the bottom right that goes away by itself (errors stay a little longer). */
export function toast(message, kind = 'error') {
  if (toastHost === null) {
    toastHost = h('div', {class: 'toasts', role: 'status', 'aria-live': 'polite'});
    document.body.append(toastHost);
  }
  const el = h('div', {class: `toast toast-${kind}`, testid: 'toast', onclick: () => el.remove()}, message);
  toastHost.append(el);
  while (toastHost.children.length > 4) toastHost.firstElementChild.remove();
  setTimeout(() => el.remove(), kind === 'error' ? 6000 : 3000);
}

/** The tail of an id, enough to tell items apart at a glance (ses_01HX...4F2A → 4f2a). */
export function shortId(id) {
  return id ? id.slice(-6).toLowerCase() : '';
}

export function relativeTime(iso) {
  if (!iso) return '';
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 5) return 'just now';
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

/** Tool arguments and results on one line, shortened: they can be huge. */
export function summarise(value, limit = 160) {
  const text = typeof value === 'string' ? value : JSON.stringify(value);
  const flat = (text ?? '').replace(/\s+/g, ' ').trim();
  return flat.length <= limit ? flat : `${flat.slice(0, limit - 1)}…`;
}
