// client/soakp-client.mjs under Node's test runner, against a running SOAKP and the fake upstream.
// Run by tests/test_client_module.py, which starts both and passes them in the environment:
//   TEST_SOAKP_URL, TEST_SOAKP_ADMIN ("user:password"), TEST_OPENAI_KEY, TEST_OPENAI_SDK (the
//   openai package's index.mjs). Node 20 needs --experimental-websocket for the global WebSocket.
// Nothing is mocked but the page's clock in one test (a frozen tab), through Date.now.

import assert from "node:assert/strict";
import { test } from "node:test";
import { pathToFileURL } from "node:url";

import { SoakpSession } from "../../client/soakp-client.mjs";

const env = process.env;
const SOAKP = env.TEST_SOAKP_URL;
const { default: OpenAI } = await import(pathToFileURL(env.TEST_OPENAI_SDK).href);
const BASIC = `Basic ${Buffer.from(env.TEST_SOAKP_ADMIN).toString("base64")}`;

/** The app's backend: mints a token at SOAKP with the admin login. Counts its calls. */
function backend(ttls) {
  const minted = [];
  const getToken = async () => {
    const ttl = ttls[Math.min(minted.length, ttls.length - 1)];
    const response = await fetch(`${SOAKP}/jwt/generate`, {
      method: "POST",
      headers: { Authorization: BASIC, "Content-Type": "application/json" },
      body: JSON.stringify({ key: env.TEST_OPENAI_KEY, ttl, sub: "node-client" }),
    });
    assert.equal(response.status, 201);
    const { data } = await response.json();
    minted.push(data.jti);
    return { token: data.jwt, expires_at: data.expires_at };
  };
  return { getToken, minted };
}

/** fetch that records what SOAKP answered to each request, for the assertions. */
function recordingFetch() {
  const seen = [];
  const recording = async (input, init) => {
    const response = await fetch(input, init);
    seen.push([new URL(String(input)).pathname, response.status]);
    return response;
  };
  return { fetch: recording, seen };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(condition, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms: ${what}`);
    await sleep(50);
  }
}

function sdk(session) {
  return new OpenAI({ ...session.openaiOptions(), maxRetries: 0, timeout: 15000 });
}

async function chat(session, text) {
  const reply = await sdk(session).chat.completions.create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: text }],
  });
  return reply.choices[0].message.content;
}

test("refreshes at SOAKP before the token expires, and the SDK uses the fresh token", async () => {
  const { getToken, minted } = backend([6]);
  const calls = recordingFetch();
  const session = await SoakpSession.start({ url: SOAKP, getToken, fetch: calls.fetch });
  try {
    const first = session.current;
    assert.equal(await chat(session, "before"), "echo: before");
    // Due at 80% of (6 s less 1 s): 4 s after it came, at least 1 s before it expires.
    await waitFor(() => session.refreshes === 1, 8000, "a refresh at 4 s");
    assert.notEqual(session.current, first);
    assert.equal(minted.length, 1, "the backend was asked once: SOAKP did the refresh");
    assert.ok(session.expiresAt > 0 && session.lastError === null);
    assert.equal(await chat(session, "after"), "echo: after");
    // The token it replaced no longer works: SOAKP revoked it when it handed out the new one.
    const stale = await fetch(`${SOAKP}/v1/models`, {
      headers: { Authorization: `Bearer ${first}` },
    });
    assert.equal(stale.status, 401);
    assert.deepEqual(calls.seen, [["/v1/chat/completions", 200], ["/jwt/refresh", 201],
      ["/v1/chat/completions", 200]]);
  } finally {
    session.close();
  }
});

test("a page whose timers did not run refreshes when it next asks for the token", async (t) => {
  const { getToken } = backend([6]);
  const session = await SoakpSession.start({ url: SOAKP, getToken, autoRefresh: false });
  const first = session.current;
  await sleep(4200); // past the refresh time (4 s), at least 0.8 s before it expires
  assert.equal(await chat(session, "late"), "echo: late");
  assert.notEqual(session.current, first);
  assert.equal(session.refreshes, 1);
});

test("on a 401 for an expired token, gets a new token and retries once", async (t) => {
  const { getToken, minted } = backend([2, 600]);
  const calls = recordingFetch();
  const session = await SoakpSession.start({ url: SOAKP, getToken, fetch: calls.fetch,
    autoRefresh: false });
  // The page's clock stands still (a frozen tab), so it believes its 2 s token is fresh.
  const frozen = Date.now();
  t.mock.method(Date, "now", () => frozen);
  await sleep(2100);
  assert.equal(await chat(session, "retried"), "echo: retried");
  assert.equal(minted.length, 2, "an expired token cannot be refreshed: a new one came instead");
  assert.deepEqual(calls.seen, [["/v1/chat/completions", 401], ["/v1/chat/completions", 200]]);
});

test("retries only once: a second 401 reaches the SDK", async (t) => {
  const { getToken, minted } = backend([2]);
  const calls = recordingFetch();
  const session = await SoakpSession.start({ url: SOAKP, getToken, fetch: calls.fetch,
    autoRefresh: false });
  const frozen = Date.now();
  t.mock.method(Date, "now", () => frozen);
  await sleep(2100);
  const original = session.getToken;
  session.getToken = async () => {
    const given = await original();
    await sleep(2100); // this one expires before it is used too
    return given;
  };
  await assert.rejects(chat(session, "twice"), (error) => error.status === 401);
  assert.equal(minted.length, 2);
  assert.deepEqual(calls.seen, [["/v1/chat/completions", 401], ["/v1/chat/completions", 401]]);
});

test("a revoked token is not refreshed: the backend gives a new one", async () => {
  const { getToken, minted } = backend([600]);
  const session = await SoakpSession.start({ url: SOAKP, getToken, autoRefresh: false });
  const revoked = await fetch(`${SOAKP}/jwt/revoke`, {
    method: "POST",
    headers: { Authorization: BASIC, "Content-Type": "application/json" },
    body: JSON.stringify({ jti: minted[0] }),
  });
  assert.equal(revoked.status, 200);
  await session.renew();
  assert.match(String(session.lastError), /refused the refresh \(401\)/);
  assert.equal(minted.length, 2);
  assert.equal(await chat(session, "new"), "echo: new");
});

test("takes SOAKP's URL from the backend when none is given", async () => {
  const { getToken } = backend([600]);
  const session = await SoakpSession.start({
    getToken: async () => ({ ...(await getToken()), soakp_url: `${SOAKP}/` }),
    autoRefresh: false,
  });
  assert.equal(session.baseURL, `${SOAKP}/v1`);
});

test("opens a Realtime WebSocket with the token as a subprotocol", async () => {
  const { getToken } = backend([600]);
  const session = await SoakpSession.start({ url: SOAKP, getToken, autoRefresh: false });
  const ws = await session.realtime("gpt-realtime");
  assert.equal(ws.url, `${SOAKP.replace(/^http/, "ws")}/v1/realtime?model=gpt-realtime`);
  const first = await new Promise((resolve, reject) => {
    ws.onmessage = (message) => resolve(JSON.parse(message.data));
    ws.onerror = () => reject(new Error("WebSocket error"));
    setTimeout(() => reject(new Error("no message in 5 s")), 5000);
  });
  assert.equal(ws.protocol, "realtime"); // never the protocol that carries the token
  assert.equal(first.type, "session.created");
  const closed = new Promise((resolve) => { ws.onclose = (event) => resolve(event.code); });
  ws.close(1000, "done");
  assert.equal(await closed, 1000);
});
