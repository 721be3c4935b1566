// The HTTP API as the page uses it: one `api()` call that sends the token and turns Corral's
// error body ({"error": {"code", "message"}}) into an ApiError the views can show in a toast.
//
// The token lives in localStorage (the page is served by the same Corral it talks to, and a
// token-protected server is the only case where it is needed). A 401 from anywhere calls
// `auth.onUnauthorized`, which shows the token prompt again.

const TOKEN_KEY = 'corral.token';

export const auth = {
  token: localStorage.getItem(TOKEN_KEY),
  onUnauthorized: null,
  set(token) {
    this.token = token || null;
    if (this.token) localStorage.setItem(TOKEN_KEY, this.token);
    else localStorage.removeItem(TOKEN_KEY);
  },
  headers() {
    return this.token ? {Authorization: `Bearer ${this.token}`} : {};
  },
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** An ApiError from a failed response, reading Corral's JSON error body when there is one. */
export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status line has to do
  }
  const error = body && body.error ? body.error : {};
  if (response.status === 401 && auth.onUnauthorized) auth.onUnauthorized();
  return new ApiError(response.status, error.code || `http_${response.status}`,
    error.message || `${response.status} ${response.statusText}`);
}

export async function api(method, path, body) {
  const headers = {...auth.headers(), Accept: 'application/json'};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: 'no-store',
    });
  } catch {
    throw new ApiError(0, 'unreachable', 'The server cannot be reached.');
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body ?? {});
export const del = (path) => api('DELETE', path);
