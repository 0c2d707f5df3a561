// soakp-client.mjs: the browser side of SOAKP, the Secure OpenAI Key Proxy. An ES module with no
// dependency and no build step; copy it next to your page.
//
// The page never holds the OpenAI key: its backend mints a short-lived SOAKP token (POST
// /jwt/generate with the admin login) and hands it to the page. This module keeps that token fresh
// (POST /jwt/refresh before it expires, the backend again when SOAKP will not refresh it), gives it
// to the official `openai` SDK without wrapping the SDK, and opens Realtime WebSockets with it.
//
//   import OpenAI from "openai";
//   import { SoakpSession } from "./soakp-client.mjs";
//
//   const soakp = await SoakpSession.start({
//     url: "https://soakp.example.com",
//     getToken: () => fetch("/api/soakp-token", { method: "POST" }).then((r) => r.json()),
//   });
//   const openai = new OpenAI({ ...soakp.openaiOptions(), dangerouslyAllowBrowser: true });
//   const ws = await soakp.realtime("gpt-realtime");
//
// getToken() returns the token as a string, or an object with `token` (or `jwt`) and optionally
// `expires_at` (unix seconds) and `soakp_url` (used when `url` is not given).

const REFRESH_AT = 0.8; // of a token's lifetime: refresh with a fifth of it left
const MIN_DELAY_MS = 1000;
const KEY_PROTOCOL = "openai-insecure-api-key.";

/** A token's claims, read without verifying (SOAKP verifies; the page only needs the times). */
function claimsOf(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload + "=".repeat((4 - (payload.length % 4)) % 4)));
  } catch {
    return {};
  }
}

function tokenFrom(given) {
  const token = typeof given === "string" ? given : given?.token ?? given?.jwt;
  if (typeof token !== "string" || token.split(".").length !== 3) {
    throw new Error("getToken() must return a SOAKP token, or an object with `token`");
  }
  return token;
}

/** Whether a request body can be sent a second time (a stream cannot). */
function replayable(body) {
  return body === undefined || body === null || typeof body === "string" ||
    body instanceof ArrayBuffer || ArrayBuffer.isView(body) ||
    (typeof Blob !== "undefined" && body instanceof Blob) ||
    (typeof FormData !== "undefined" && body instanceof FormData) ||
    body instanceof URLSearchParams;
}

/** Whether a 401 from SOAKP says the token has expired (rather than being revoked or invalid). */
async function saysExpired(response) {
  try {
    const { error } = await response.clone().json();
    return error?.code === "token_expired" || /expired/i.test(error?.message ?? "");
  } catch {
    return false;
  }
}

export class SoakpSession {
  /**
   * Get the first token and return a session that keeps it fresh.
   * Options: url (SOAKP's base URL), getToken (async, asks your backend for a token), fetch and
   * WebSocket (default: the browser's), autoRefresh (default true: refresh on a timer too, so an
   * idle page keeps a live token), onToken (called with the session after every new token).
   */
  static async start(options) {
    const session = new SoakpSession(options);
    await session.renew("backend");
    return session;
  }

  constructor({ url, getToken, fetch: fetchImpl, WebSocket: socketImpl, autoRefresh = true,
                onToken } = {}) {
    if (typeof getToken !== "function") throw new TypeError("SoakpSession needs getToken()");
    this.url = url?.replace(/\/+$/, "");
    this.getToken = getToken;
    this.fetchImpl = fetchImpl ?? globalThis.fetch.bind(globalThis);
    this.socketImpl = socketImpl ?? globalThis.WebSocket;
    this.autoRefresh = autoRefresh;
    this.onToken = onToken;
    this.current = null; // the token now in use
    this.expiresAt = 0; // its expiry, unix seconds (SOAKP's clock)
    this.refreshAtMs = 0; // when to refresh it, by this page's clock
    this.refreshes = 0; // tokens obtained from /jwt/refresh
    this.lastError = null; // why the last refresh at SOAKP failed, if it did
    this.pending = null;
    this.timer = null;
    // Bound, so they can be handed to the SDK as they are.
    this.apiKey = () => this.token();
    this.fetch = (input, init) => this.fetchWithRetry(input, init);
  }

  /** The base URL for the OpenAI SDK: SOAKP's /v1. */
  get baseURL() {
    return `${this.url}/v1`;
  }

  /** The options to spread into `new OpenAI({...})`: baseURL, apiKey (asked before every request,
   * so always the current token) and fetch (retries once when SOAKP says the token expired). */
  openaiOptions() {
    return { baseURL: this.baseURL, apiKey: this.apiKey, fetch: this.fetch };
  }

  /** The current token, refreshed first when it is due. */
  async token() {
    if (this.pending) return this.pending;
    if (this.current === null) return this.renew("backend");
    if (Date.now() >= this.refreshAtMs) return this.renew("refresh");
    return this.current;
  }

  /**
   * A new token: from SOAKP's /jwt/refresh (how = "refresh"), falling back to getToken() when
   * SOAKP refuses (revoked, past its renew-until time, expired while the laptop slept), or from
   * getToken() at once (how = "backend"). Concurrent callers share one renewal.
   */
  renew(how = "refresh") {
    this.pending ??= (async () => {
      try {
        let given = null;
        if (how === "refresh" && this.current !== null) {
          try {
            given = await this.refreshAtSoakp();
            this.refreshes += 1;
            this.lastError = null;
          } catch (error) {
            this.lastError = error;
          }
        }
        given ??= await this.getToken();
        this.adopt(given);
        return this.current;
      } finally {
        this.pending = null;
      }
    })();
    return this.pending;
  }

  async refreshAtSoakp() {
    const response = await this.fetchImpl(`${this.url}/jwt/refresh`, {
      method: "POST",
      headers: { Authorization: `Bearer ${this.current}` },
    });
    if (!response.ok) throw new Error(`SOAKP refused the refresh (${response.status})`);
    const { data } = await response.json();
    return { token: data.jwt, expires_at: data.expires_at };
  }

  adopt(given) {
    const token = tokenFrom(given);
    const claims = claimsOf(token);
    if (!this.url && typeof given?.soakp_url === "string") {
      this.url = given.soakp_url.replace(/\/+$/, "");
    }
    if (!this.url) throw new Error("SoakpSession needs `url`, or getToken() returning `soakp_url`");
    this.current = token;
    this.expiresAt = given?.expires_at ?? claims.exp ?? 0;
    // The lifetime by SOAKP's clock (exp - iat), counted from now by ours, so that clock skew does
    // not matter; less a second, since iat is a whole second and the token may be nearly that old.
    const lifetimeS = Number.isFinite(claims.exp - claims.iat) ? claims.exp - claims.iat - 1 :
      this.expiresAt - Date.now() / 1000;
    this.refreshAtMs = Date.now() + Math.max(0, lifetimeS * 1000 * REFRESH_AT);
    clearTimeout(this.timer);
    if (this.autoRefresh) {
      this.timer = setTimeout(() => {
        this.token().catch(() => {}); // failures show on the next use, and in lastError
      }, Math.max(MIN_DELAY_MS, this.refreshAtMs - Date.now()));
    }
    this.onToken?.(this);
  }

  /** fetch() for the SDK: when SOAKP answers 401 because the token expired, get a new token and
   * send the request once more (unless its body was a stream, which cannot be sent twice). */
  async fetchWithRetry(input, init = {}) {
    const response = await this.fetchImpl(input, init);
    if (response.status !== 401 || !replayable(init.body) || !(await saysExpired(response))) {
      return response;
    }
    const sent = new Headers(init.headers).get("Authorization");
    // The token it was sent with may have been replaced meanwhile: then the current one will do.
    const stale = sent === `Bearer ${this.current}`;
    const token = stale ? await this.renew("backend") : await this.token();
    const headers = new Headers(init.headers);
    headers.set("Authorization", `Bearer ${token}`);
    return this.fetchImpl(input, { ...init, headers });
  }

  /**
   * A WebSocket to the Realtime API. Browsers cannot set Authorization on a WebSocket, so the token
   * travels as the subprotocol `openai-insecure-api-key.<token>`; SOAKP swaps in the key, and its
   * answer names `realtime`, which is offered too (a browser drops a handshake whose answer names
   * no protocol it offered).
   */
  async realtime(model, { path = "/v1/realtime", query = {} } = {}) {
    const token = await this.token();
    const url = new URL(this.url + path);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    if (model) url.searchParams.set("model", model);
    for (const [name, value] of Object.entries(query)) url.searchParams.set(name, value);
    return new this.socketImpl(url.href, ["realtime", KEY_PROTOCOL + token]);
  }

  /** Stop refreshing in the background (the token stays usable until it expires). */
  close() {
    clearTimeout(this.timer);
    this.timer = null;
    this.autoRefresh = false;
  }
}
