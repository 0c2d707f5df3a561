// The browser side of the SOAKP story. No build step: the official `openai` SDK is an ES module
// that our own backend serves (make demo vendors it with `npm install openai`), and so is
// soakp-client.mjs, the repository's client/ module that keeps the page's SOAKP token fresh.
import { SoakpSession } from "/soakp-client.mjs";

const $ = (id) => document.getElementById(id);

// What happened, for people (the page) and for the headless test (window.demo.state).
const state = {
  refreshes: 0,
  tokenError: null,
  chat: { chunks: 0, text: "", done: false, error: null },
  realtime: { protocol: null, echo: null, closeCode: null, error: null },
};
window.demo = { state };

let OpenAI;
try {
  ({ default: OpenAI } = await import("/vendor/openai/index.mjs"));
} catch (error) {
  $("token-status").textContent = "The openai SDK is not there: run `make demo` (it runs npm install openai).";
  throw error;
}

// 1. The token ---------------------------------------------------------------------------------------------
// Our backend mints it: short-lived, usable only from this origin, for this page's endpoints and
// models. soakp-client.mjs refreshes it at SOAKP before it expires, and asks our backend for a new
// one when SOAKP will not refresh it (revoked, or expired while the laptop slept).

// What the backend said last: {token, expires_at, soakp_url, chat_model, realtime_model}.
let given = null;

async function tokenFromBackend() {
  const response = await fetch("/api/soakp-token", { method: "POST" });
  if (!response.ok) throw new Error(`the backend gave no token (${response.status})`);
  given = await response.json();
  return given;
}

function showToken(session) {
  state.refreshes = session.refreshes;
  state.tokenError = session.lastError ? String(session.lastError) : null;
  const until = new Date(session.expiresAt * 1000).toLocaleTimeString();
  $("token-status").textContent = `Token valid until ${until}; refreshed ${state.refreshes} times.` +
    (state.tokenError ? ` Last problem: ${state.tokenError}` : "");
}

// SOAKP's URL comes from the backend too (given.soakp_url).
const soakp = await SoakpSession.start({ getToken: tokenFromBackend, onToken: showToken });

// 2. A streamed chat completion with the official SDK ------------------------------------------------------

// baseURL, apiKey (asked before every request, so always the current token) and fetch (which
// retries once when SOAKP says the token expired) from the session; the SDK's API stays its own.
const client = new OpenAI({
  ...soakp.openaiOptions(),
  dangerouslyAllowBrowser: true, // safe here: the page holds a SOAKP token, not the OpenAI key
});

async function chat(text) {
  const output = $("chat-output");
  output.textContent = "";
  Object.assign(state.chat, { chunks: 0, text: "", done: false, error: null });
  $("chat-status").textContent = "streaming…";
  try {
    const stream = await client.chat.completions.create({
      model: given.chat_model,
      stream: true,
      messages: [{ role: "user", content: text }],
    });
    for await (const chunk of stream) {
      const piece = chunk.choices[0]?.delta?.content;
      if (piece) {
        output.textContent += piece;
        state.chat.chunks += 1;
        state.chat.text = output.textContent;
      }
    }
    state.chat.done = true;
    $("chat-status").textContent = `done: ${state.chat.chunks} chunks`;
  } catch (error) {
    state.chat.error = String(error);
    $("chat-status").textContent = `failed: ${error.message}`;
  }
  return state.chat;
}

// 3. The Realtime API over a WebSocket ---------------------------------------------------------------------
// A browser cannot set Authorization on a WebSocket, so soakp.realtime() passes the token as a
// subprotocol; SOAKP swaps it for the key. SOAKP's answer names "realtime", never the protocol that
// carries the token.

async function realtime(text) {
  const log = (line) => { $("realtime-log").textContent += line + "\n"; };
  Object.assign(state.realtime, { protocol: null, echo: null, closeCode: null, error: null });
  $("realtime-log").textContent = "";
  const ws = await soakp.realtime(given.realtime_model);
  return new Promise((resolve) => {
    ws.onopen = () => {
      state.realtime.protocol = ws.protocol;
      log(`connected (subprotocol "${ws.protocol}")`);
    };
    ws.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "session.created") {
        log(`← session.created (model ${event.session?.model})`);
        const item = { type: "conversation.item.create",
                       item: { type: "message", role: "user", content: [{ type: "input_text", text }] } };
        ws.send(JSON.stringify(item));
        log(`→ ${item.type}: ${text}`);
      } else {
        const said = event.item?.content?.[0]?.text;
        log(`← ${event.type}${said === undefined ? "" : `: ${said}`}`);
        state.realtime.echo = said ?? null;
        ws.close(1000, "done");
      }
    };
    ws.onerror = () => {
      state.realtime.error = "WebSocket error";
      log("error (see the browser console)");
    };
    ws.onclose = (event) => {
      state.realtime.closeCode = event.code;
      log(`closed (${event.code})`);
      resolve(state.realtime);
    };
  });
}

// Wire up the page, and run both once so there is something to see. ---------------------------------------
// Each section does one thing at a time: its button is off while it runs (and until the page's own
// first runs are over), and a second call waits for the first: two answers never interleave.

let ready = false;

function oneAtATime(buttonId, run) {
  let last = Promise.resolve();
  return (...args) => {
    const next = last.then(async () => {
      $(buttonId).disabled = true;
      try {
        return await run(...args);
      } finally {
        $(buttonId).disabled = !ready;
      }
    });
    last = next.catch(() => {});
    return next;
  };
}

const chatInTurn = oneAtATime("chat-send", chat);
const realtimeInTurn = oneAtATime("realtime-send", realtime);
Object.assign(window.demo, { chat: chatInTurn, realtime: realtimeInTurn, ready: false });
$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (!$("chat-send").disabled) chatInTurn($("chat-input").value);
});
$("realtime-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (!$("realtime-send").disabled) realtimeInTurn($("realtime-input").value);
});
await chatInTurn($("chat-input").value);
await realtimeInTurn($("realtime-input").value);
ready = window.demo.ready = true;
$("chat-send").disabled = $("realtime-send").disabled = false;
