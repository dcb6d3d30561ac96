// The HTTP API through Node.js's global fetch, the way a Node backend
// without a MySQL driver talks to comet. The server is the real binary;
// WebSocket clients check what arrives.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startComet, subscriber, until } from '../js/harness.mjs';

const KEY = 'fetchpw';
let srv;

before(async () => { srv = await startComet({ password: KEY }); });
after(() => srv?.stop());

/** One API call; resolves to [status, parsed JSON body]. */
async function api(method, path, body, key = KEY) {
  const headers = { 'Content-Type': 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  const r = await fetch(`${srv.apiBase}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  return [r.status, await r.json()];
}

test('fetch publishes to a channel a WebSocket subscriber receives', async () => {
  const sub = await subscriber(srv.front, 'fetch_chan');
  try {
    await until('subscribed', async () => (await api('GET', '/api/pipes?name=fetch_chan'))[1].rows?.[0]?.users === 1);
    const [status, body] = await api('POST', '/api/pipes_messages', { name: 'fetch_chan', event: 'ev', message: { from: 'fetch' } });
    assert.deepEqual([status, body], [200, { affected: 1 }]);
    const m = await until('delivery', () => sub.messages.find((x) => x.pipe === 'fetch_chan'));
    assert.deepEqual(JSON.parse(m.data), { from: 'fetch' });
  } finally { sub.close(); }
});

test('fetch authorizes a user and sends it a private message', async () => {
  assert.deepEqual(await api('POST', '/api/users_auth', { id: 77, hash: 'k77' }), [200, { affected: 1, last_insert_id: 77 }]);
  const user = await subscriber(srv.front, null, 'sesion=k77&myid=77&devid=0&v=4.08&uuid=fetch77');
  try {
    const info = await until('serverInfo', () => user.messages.find((x) => x.event === 'serverInfo'));
    assert.equal(info.authorized, true);
    assert.deepEqual(await api('POST', '/api/users_messages', [{ id: 77, event: 'hi', message: 'private' }]), [200, { affected: 1, last_insert_id: 77 }]);
    const m = await until('private message', () => user.messages.find((x) => x.pipe === 'msg'));
    assert.equal(m.data, 'private');
    assert.deepEqual(await api('GET', '/api/users_time?id=77'), [200, { rows: [{ id: 77, time: 0 }] }]);
  } finally { user.close(); }
});

test('fetch sees the errors with their status and CometQL code', async () => {
  const code = async (...a) => { const [s, b] = await api(...a); return [s, b.error?.code]; };
  assert.deepEqual(await code('GET', '/api/pipes?name=abc', undefined, 'wrong'), [401, 16]);
  assert.deepEqual(await code('GET', '/api/nope?name=abc'), [404, 15]);
  assert.deepEqual(await code('PATCH', '/api/pipes?name=abc'), [405, 2]);
  assert.deepEqual(await code('POST', '/api/pipes_messages', { name: 'a b', event: 'e', message: 'm' }), [422, 12]);
  const r = await fetch(`${srv.apiBase}/api/pipes_messages`, { method: 'POST', headers: { 'X-API-Key': KEY }, body: '{oops' });
  assert.equal(r.status, 400);
  assert.equal((await r.json()).error.code, 3);
});
