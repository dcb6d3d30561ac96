// comet.js and the demo page in a real browser (headless Debian Chromium via
// playwright-core), against the real server binary and the real `mysql` client.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { chromium } from 'playwright-core';
import { startComet, until } from '../js/harness.mjs';

const PASSWORD = 'browserpw';
let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic', '--no-first-run'],
  });
});
after(async () => { await browser?.close(); });

/** Starts comet on the given (or free) ports. */
const startServer = (ports) => startComet({ password: PASSWORD, ports, extraArgs: ['--node-name', 'browser-test'] });

function mysql(srv, sql) {
  return execFileSync('mysql', ['-h', '127.0.0.1', '-P', String(srv.back), '-u', 'root', `-p${PASSWORD}`, '--batch', '--skip-column-names', '-e', sql]).toString();
}

async function metric(srv, line) {
  const body = await (await fetch(`${srv.base}/metrics`)).text();
  // One series per shard: the total is their sum.
  const ls = body.split('\n').filter((x) => x.startsWith(`${line}{`));
  assert.ok(ls.length, `no metric ${line}`);
  return ls.reduce((sum, x) => sum + Number(x.split(' ').pop()), 0);
}

/** A page on the server's origin with comet.js loaded but not started.
 * The document must come from the server itself (here `/info`): Chromium's
 * local-network-access checks refuse a WebSocket to 127.0.0.1 from a page
 * whose address space it cannot tell. */
async function page(srv, context) {
  const ctx = context ?? (await browser.newContext());
  const p = await ctx.newPage();
  p.on('pageerror', (e) => console.error('page error:', e));
  await p.goto(`${srv.base}/info`);
  await p.addScriptTag({ url: `${srv.base}/comet.js` });
  await p.evaluate(() => {
    window.got = [];
    window.record = (name) => CometServer().subscription(name, (e) => window.got.push({ name, data: e.data, info: e.server_info }));
  });
  return p;
}

const received = (p, name) => p.evaluate((n) => window.got.filter((g) => g.name === n), name);

async function subscribers(p, pipe) {
  return p.evaluate((pipe) => new Promise((r) => CometServer().count_users_in_pipe(pipe, (e) => r(e.data.user_in_pipe))), pipe);
}

test('two browsers chat over a web_ channel and the sender gets its delivery report', async () => {
  const srv = await startServer();
  try {
    const a = await page(srv);
    const b = await page(srv);
    for (const p of [a, b]) {
      await p.evaluate(() => { record('web_chat.message'); record('#web_chat'); CometServer().start({}); });
    }
    await until('both subscribed', async () => (await subscribers(a, 'web_chat')) === 2);
    await a.evaluate(() => CometServer().web_pipe_send('web_chat', 'message', { text: 'hi from a' }));
    const got = await until('b receives', async () => (await received(b, 'web_chat.message'))[0]);
    assert.deepEqual(got.data, { text: 'hi from a' });
    assert.equal(got.info.user_id, 0);
    const report = await until('a gets its report', async () => (await received(a, '#web_chat'))[0]);
    assert.equal(report.data.number_messages, 1);
    assert.equal((await received(a, 'web_chat.message')).length, 0, 'no echo to the sender');
  } finally { await srv.stop(); }
});

/** A redis-server on a free port, without persistence (tests/cluster.rs has more cluster tests). */
async function startRedis() {
  const port = await new Promise((r) => { const s = createServer(); s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => r(p)); }); });
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  const cli = (...args) => execFileSync('redis-cli', ['-p', String(port), ...args]).toString().trim();
  await until('redis-server answers', async () => { try { return cli('PING') === 'PONG'; } catch { return false; } });
  return { port, cli, url: `redis://127.0.0.1:${port}`, stop: () => child.kill('SIGKILL') };
}

test('cluster: a page on node A and a page on node B chat through Redis', async () => {
  const redis = await startRedis();
  const nodes = [];
  try {
    for (let i = 0; i < 2; i++) {
      nodes.push(await startComet({ password: PASSWORD, extraArgs: ['--node-name', `node-${i}`, '--redis', redis.url] }));
    }
    const [a, b] = [await page(nodes[0]), await page(nodes[1])];
    for (const p of [a, b]) {
      await p.evaluate(() => { record('web_chat.message'); CometServer().start({}); });
    }
    await until('both nodes subscribed', async () => redis.cli('PUBSUB', 'NUMSUB', 'comet:0:pipe:web_chat').endsWith('2'));
    await a.evaluate(() => CometServer().web_pipe_send('web_chat', 'message', { text: 'hi from node A' }));
    const atB = await until('b receives', async () => (await received(b, 'web_chat.message'))[0]);
    assert.deepEqual(atB.data, { text: 'hi from node A' });
    await b.evaluate(() => CometServer().web_pipe_send('web_chat', 'message', { text: 'hi from node B' }));
    const atA = await until('a receives', async () => (await received(a, 'web_chat.message'))[0]);
    assert.deepEqual(atA.data, { text: 'hi from node B' });
    await new Promise((r) => setTimeout(r, 300));
    assert.equal((await received(a, 'web_chat.message')).length, 1, 'once each, no echo');
    assert.equal((await received(b, 'web_chat.message')).length, 1, 'once each, no echo');
  } finally {
    for (const n of nodes) await n.stop();
    redis.stop();
  }
});

test('cluster failover: a page whose node is SIGKILLed moves to the other node of its list at once and keeps receiving', async () => {
  const redis = await startRedis();
  const nodes = [];
  try {
    for (let i = 0; i < 2; i++) {
      nodes.push(await startComet({ password: PASSWORD, extraArgs: ['--node-name', `node-${i}`, '--redis', redis.url] }));
    }
    const p = await page(nodes[0]);
    const list = nodes.map((n) => `127.0.0.1:${n.front}`);
    await p.evaluate((list) => {
      // Every WebSocket the page opens, by URL.
      window.wsUrls = [];
      const W = window.WebSocket;
      window.WebSocket = class extends W { constructor(u, p) { super(u, p); window.wsUrls.push(u); } };
      record('web_fail.message');
      CometServer().start({ nodes: list });
    }, list);
    // The first node is picked at random: find it.
    const on = await until('the page is on a node', async () => {
      for (let i = 0; i < 2; i++) if ((await metric(nodes[i], 'comet_websockets')) === 1) return i + 1;
      return 0;
    }) - 1;
    const [dead, live] = [nodes[on], nodes[1 - on]];
    await until('the node subscribed', async () => redis.cli('PUBSUB', 'NUMSUB', 'comet:0:pipe:web_fail').endsWith('1'));
    mysql(live, "INSERT INTO pipes_messages (name, event, message) VALUES ('web_fail', 'message', 'before')");
    await until('the page receives', async () => (await received(p, 'web_fail.message')).length === 1);

    const opened = await p.evaluate(() => window.wsUrls.length);
    await dead.stop();
    nodes.splice(nodes.indexOf(dead), 1);
    // The next node of the list at the first reconnect (within the first
    // backoff step, 500 ms), not the dead one again.
    await until('the page is on the other node', async () => (await metric(live, 'comet_websockets')) === 1, 2500);
    const next = await p.evaluate((n) => window.wsUrls.slice(n), opened);
    assert.ok(next[0].includes(`:${live.front}/`), `the first reconnect went to ${next[0]}, not the live node`);
    await until('the other node subscribed', async () => redis.cli('PUBSUB', 'NUMSUB', 'comet:0:pipe:web_fail').endsWith('1'));
    mysql(live, "INSERT INTO pipes_messages (name, event, message) VALUES ('web_fail', 'message', 'after')");
    const got = await until('the page receives through the other node', async () => {
      const r = await received(p, 'web_fail.message');
      return r.length === 2 && r;
    });
    assert.deepEqual(got.map((g) => g.data), ['before', 'after']);
  } finally {
    for (const n of nodes) await n.stop();
    redis.stop();
  }
});

test('permessage-deflate: Chromium negotiates it, big messages both ways arrive whole and compressed', async () => {
  const srv = await startServer();
  try {
    const a = await page(srv);
    const b = await page(srv);
    for (const p of [a, b]) {
      await p.evaluate(() => { record('web_big.message'); CometServer().start({}); });
    }
    await until('both subscribed', async () => (await subscribers(a, 'web_big')) === 2);
    assert.ok(await metric(srv, 'comet_deflate_websockets_total') >= 2, 'Chromium offered and comet accepted');
    const text = 'a long chat line that compresses well; '.repeat(60);
    await a.evaluate((t) => CometServer().web_pipe_send('web_big', 'message', { text: t }), text);
    const got = await until('b receives the big message', async () => (await received(b, 'web_big.message'))[0]);
    assert.deepEqual(got.data, { text });
    assert.ok(await metric(srv, 'comet_deflated_frames_total') >= 1, 'the big message went compressed');
    assert.ok(await metric(srv, 'comet_deflate_bytes_saved_total') > 1000);
    // Chromium compresses what it sends too: comet inflated it.
    assert.ok(await metric(srv, 'comet_inflated_messages_total') >= 1, 'the browser sent compressed');
  } finally { await srv.stop(); }
});

test('presence: a second browser joining and leaving shows up in the first', async () => {
  const srv = await startServer();
  try {
    const a = await page(srv);
    await a.evaluate(() => { record('track_room'); CometServer().start({ uuid: 'watcher' }); });
    await until('a subscribed', async () => (await subscribers(a, 'track_room')) === 1);
    const ctxB = await browser.newContext();
    const b = await page(srv, ctxB);
    await b.evaluate(() => { record('track_room'); CometServer().start({ uuid: 'visitor42' }); });
    const join = await until('join event', async () => (await received(a, 'track_room')).find((g) => g.info.event === 'subscription'));
    assert.deepEqual(join.data, { user_id: 0, uuid: 'visitor42' });
    const list = await a.evaluate(() => new Promise((r) => CometServer().getTrackPipeUsers('track_room', (e) => r(e.data))));
    assert.deepEqual(list.map((m) => m.uuid).sort(), ['visitor42', 'watcher']);
    await ctxB.close();
    const leave = await until('leave event', async () => (await received(a, 'track_room')).find((g) => g.info.event === 'unsubscription'));
    assert.equal(leave.data.uuid, 'visitor42');
  } finally { await srv.stop(); }
});

test('a user authorized through CometQL: isAuthorized goes undefined -> true, and two tabs share one socket for private messages', async () => {
  const srv = await startServer();
  try {
    mysql(srv, "INSERT INTO users_auth (id, hash) VALUES (7, 'tab-key-7')");
    const ctx = await browser.newContext();
    const tab1 = await page(srv, ctx);
    const before = await tab1.evaluate(() => { record('msg'); CometServer().start({ user_id: 7, user_key: 'tab-key-7' }); return CometServer().isAuthorized(); });
    assert.equal(before, undefined);
    await until('tab 1 authorized', () => tab1.evaluate(() => CometServer().isAuthorized() === true));
    const tab2 = await page(srv, ctx);
    await tab2.evaluate(() => { record('msg'); CometServer().start({ user_id: 7, user_key: 'tab-key-7' }); });
    await until('tab 2 authorized', () => tab2.evaluate(() => CometServer().isAuthorized() === true));
    await until('tab 2 joined the group', () => tab2.evaluate(() => CometServer().isConnected()));
    assert.equal(await metric(srv, 'comet_websockets'), 1, 'one WebSocket for both tabs');
    mysql(srv, "INSERT INTO users_messages (id, event, message) VALUES (7, 'note', '{\\\"n\\\":1}')");
    for (const t of [tab1, tab2]) {
      const m = await until('private message', async () => (await received(t, 'msg'))[0]);
      assert.deepEqual(m.data, { n: 1 });
      assert.equal(m.info.event, 'note');
    }
    // Closing the leader tab hands the socket to the other within a second.
    const leaderFirst = await tab1.evaluate(() => CometServer().role);
    const [leader, other] = leaderFirst === 'leader' ? [tab1, tab2] : [tab2, tab1];
    const closedAt = Date.now();
    await leader.close();
    await until('takeover', () => other.evaluate(() => CometServer().role === 'leader' && CometServer().isConnected()), 3000);
    const tookMs = Date.now() - closedAt;
    assert.ok(tookMs < 1000, `takeover took ${tookMs} ms`);
    mysql(srv, "INSERT INTO users_messages (id, event, message) VALUES (7, 'note', 'after takeover')");
    await until('message after takeover', async () => (await received(other, 'msg')).some((g) => g.data === 'after takeover'));
  } finally { await srv.stop(); }
});

test('a wrong key gives isAuthorized() false and onAuthFalill fires', async () => {
  const srv = await startServer();
  try {
    mysql(srv, "INSERT INTO users_auth (id, hash) VALUES (8, 'right')");
    const p = await page(srv);
    await p.evaluate(() => {
      window.fails = 0; window.successes = 0;
      CometServer().onAuthFalill(() => { window.fails++; });
      CometServer().onAuthSuccess(() => { window.successes++; });
      CometServer().start({ user_id: 8, user_key: 'wrong' });
    });
    await until('auth answer', () => p.evaluate(() => CometServer().isAuthorized() !== undefined));
    assert.equal(await p.evaluate(() => CometServer().isAuthorized()), false);
    assert.deepEqual(await p.evaluate(() => [window.fails, window.successes]), [1, 0]);
  } finally { await srv.stop(); }
});

test('the server restarts under the page: the client reconnects, resubscribes and receives the next message', async () => {
  let srv = await startServer();
  const ports = { front: srv.front, back: srv.back };
  try {
    const p = await page(srv);
    await p.evaluate(() => { record('news_live'); CometServer().start({}); });
    await until('subscribed', async () => mysql(srv, "SELECT users FROM pipes WHERE name = 'news_live'").trim() === '1');
    await srv.stop();
    await until('page sees the disconnect', () => p.evaluate(() => !CometServer().isConnected()));
    srv = await startServer(ports);
    await until('reconnected and resubscribed', async () => mysql(srv, "SELECT users FROM pipes WHERE name = 'news_live'").trim() === '1', 20000);
    mysql(srv, "INSERT INTO pipes_messages (name, event, message) VALUES ('news_live', 'flash', 'back online')");
    const m = await until('message after restart', async () => (await received(p, 'news_live'))[0]);
    assert.equal(m.data, 'back online');
  } finally { await srv.stop(); }
});

test('channels wanted before connecting go in the URL, not in a message; later changes and long lists go by message', async () => {
  let srv = await startServer();
  const ports = { front: srv.front, back: srv.back };
  try {
    const p = await page(srv);
    await p.evaluate(() => {
      // Every WebSocket the page opens (its URL) and every text it sends.
      window.wsUrls = []; window.sent = [];
      const W = window.WebSocket;
      window.WebSocket = class extends W {
        constructor(u, pr) { super(u, pr); window.wsUrls.push(u); }
        send(t) { window.sent.push(t); return super.send(t); }
      };
      record('news_url'); record('web_url.message');
      CometServer().start({});
    });
    const count = (name) => mysql(srv, `SELECT users FROM pipes WHERE name = '${name}'`).trim();
    await until('subscribed by URL', async () => count('news_url') === '1' && count('web_url') === '1');
    const url = await p.evaluate(() => window.wsUrls[0]);
    assert.match(url, /&subscription=news_url%2Cweb_url$/);
    assert.deepEqual(await p.evaluate(() => window.sent.filter((t) => t.startsWith('subscription'))), [], 'no subscription message');
    // A change while connected is a message, as before.
    await p.evaluate(() => record('later_chan'));
    await until('subscribed by message', async () => count('later_chan') === '1');
    assert.deepEqual(await p.evaluate(() => window.sent), ['subscription\nnews_url\nweb_url\nlater_chan']);
    // A reconnect carries the whole current set in its URL.
    await srv.stop();
    await until('page sees the disconnect', () => p.evaluate(() => !CometServer().isConnected()));
    srv = await startServer(ports);
    await until('reconnected', async () => count('later_chan') === '1' && count('news_url') === '1', 20000);
    assert.match(await p.evaluate(() => window.wsUrls[1]), /&subscription=news_url%2Cweb_url%2Clater_chan$/);
    assert.equal(await p.evaluate(() => window.sent.length), 1, 'still one subscription message in all');
    mysql(srv, "INSERT INTO pipes_messages (name, event, message) VALUES ('web_url', 'message', 'via url')");
    assert.equal((await until('message', async () => (await received(p, 'web_url.message'))[0])).data, 'via url');
    // A list longer than the URL allows: no subscription in the URL, a message instead.
    const q = await page(srv);
    await q.evaluate(() => {
      window.wsUrls = []; window.sent = [];
      const W = window.WebSocket;
      window.WebSocket = class extends W {
        constructor(u, pr) { super(u, pr); window.wsUrls.push(u); }
        send(t) { window.sent.push(t); return super.send(t); }
      };
      for (let i = 0; i < 30; i++) record(`long_channel_name_number_${String(i).padStart(3, '0')}_with_padding`);
      CometServer().start({});
    });
    await until('long list subscribed', async () => count('long_channel_name_number_029_with_padding') === '1');
    assert.doesNotMatch(await q.evaluate(() => window.wsUrls[0]), /subscription=/);
    assert.equal(await q.evaluate(() => window.sent.filter((t) => t.startsWith('subscription\n')).length), 1);
  } finally { await srv.stop(); }
});

test('against a server that ignores the URL list (no "subscribed" in serverInfo) the client subscribes by message', async () => {
  const srv = await startServer();
  try {
    const p = await page(srv);
    await p.evaluate(() => {
      // The URL loses its list on the way, as with CppComet or an older
      // comet, which do not read it.
      window.sent = [];
      const W = window.WebSocket;
      window.WebSocket = class extends W {
        constructor(u, pr) { super(u.replace(/&subscription=[^&]*/, ''), pr); }
        send(t) { window.sent.push(t); return super.send(t); }
      };
      record('news_old'); record('web_old.message');
      CometServer().start({});
    });
    const count = (name) => mysql(srv, `SELECT users FROM pipes WHERE name = '${name}'`).trim();
    await until('subscribed by message', async () => count('news_old') === '1' && count('web_old') === '1');
    assert.deepEqual(await p.evaluate(() => window.sent), ['subscription\nnews_old\nweb_old']);
  } finally { await srv.stop(); }
});

test('an upgrade refused over --max-accept-rate: the client reads Retry-After from /info and reconnects after it, not before', async () => {
  // One new connection a second, burst one.
  const srv = await startComet({ password: PASSWORD, extraArgs: ['--node-name', 'browser-test', '--max-accept-rate', '1'] });
  try {
    const ctx = await browser.newContext();
    const p = await ctx.newPage();
    p.on('pageerror', (e) => console.error('page error:', e));
    await until('page loaded', async () => (await p.goto(`${srv.base}/info`)).status() === 200);
    // The script is a second connection: refused until the bucket refills.
    await until('comet.js loaded', async () => {
      try { await p.addScriptTag({ url: `${srv.base}/comet.js` }); return true; } catch { return false; }
    }, 5000);
    // That took the only token: the next comes a second later, so the
    // upgrade and the client's /info probe are both refused.
    await p.evaluate(() => {
      window.log = [];
      const t0 = performance.now();
      const W = window.WebSocket;
      window.WebSocket = function (url, protocols) {
        window.log.push({ what: 'ws', t: performance.now() - t0 });
        return new W(url, protocols);
      };
      const f = window.fetch;
      window.fetch = (...args) => f(...args).then((r) => {
        window.log.push({ what: 'fetch', t: performance.now() - t0, status: r.status, retry: r.headers.get('Retry-After') });
        return r;
      });
      CometServer().start({});
    });
    await until('connected', () => p.evaluate(() => CometServer().isConnected()), 15000);
    const log = await p.evaluate(() => window.log);
    const ws = log.filter((e) => e.what === 'ws');
    const probe = log.find((e) => e.what === 'fetch');
    assert.ok(probe, JSON.stringify(log));
    assert.equal(probe.status, 503, JSON.stringify(log));
    assert.equal(probe.retry, '2', 'Retry-After is readable across origins');
    assert.equal(ws.length, 2, `one refused upgrade, one after the wait: ${JSON.stringify(log)}`);
    const waited = ws[1].t - probe.t;
    assert.ok(waited >= 2000 && waited <= 4500, `reconnected ${waited} ms after the refusal (Retry-After: 2, jitter up to 2 s)`);
    // /metrics is a new connection too, answered once a token is there.
    await until('refusals counted', async () => {
      try { return (await metric(srv, 'comet_refused_rate_total')) >= 2; } catch { return false; }
    });
    console.log('refused and reconnected:', JSON.stringify(log));
    await ctx.close();
  } finally { await srv.stop(); }
});

test('the demo page renders, connects and shows the mysql commands', async () => {
  const srv = await startServer();
  try {
    const ctx = await browser.newContext({ viewport: { width: 1100, height: 800 } });
    const p = await ctx.newPage();
    await p.goto(`${srv.base}/`);
    await until('connected', async () => (await p.textContent('#conn-state')) === 'connected');
    await until('in the presence list', async () => Number(await p.textContent('#presence-count')) >= 1);
    const box = await p.textContent('#mysql-box');
    assert.match(box, new RegExp(`-P ${srv.back} `));
    assert.match(box, /INSERT INTO users_messages/);
    const shot = await p.screenshot({ type: 'jpeg', quality: 80, path: process.env.SCREENSHOT || undefined });
    // A blank page compresses to a few KB; the demo is far richer.
    assert.ok(shot.length > 20000, `screenshot is only ${shot.length} bytes`);
    await p.setViewportSize({ width: 390, height: 800 });
    const overflow = await p.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
    assert.equal(overflow, false, 'no horizontal scrolling in a phone-sized window');
  } finally { await srv.stop(); }
});

test('examples/browser/index.html, served from its own origin, shows a channel message and, once the form logs in, the queued private message', async () => {
  const srv = await startServer();
  // Serve the example page as its README says: a static server on another port.
  const html = readFileSync(new URL('../../examples/browser/index.html', import.meta.url));
  const site = createServer((req, res) => { res.writeHead(200, { 'Content-Type': 'text/html' }); res.end(html); });
  await new Promise((r) => site.listen(0, '127.0.0.1', r));
  try {
    const p = await (await browser.newContext()).newPage();
    p.on('pageerror', (e) => console.error('page error:', e));
    await p.goto(`http://127.0.0.1:${site.address().port}/?comet=127.0.0.1:${srv.front}&channel=news_example`);
    await until('connected anonymously', async () => (await p.textContent('#status')) === 'connected, anonymous');
    await until('subscribed', async () => mysql(srv, "SELECT users FROM pipes WHERE name = 'news_example'").trim() === '1');
    mysql(srv, "INSERT INTO pipes_messages (name, event, message) VALUES ('news_example', 'update', '{\"headline\":\"from the backend\"}')");
    await until('channel message shown', async () => (await p.textContent('#log')).includes('news_example / update: {"headline":"from the backend"}'));
    mysql(srv, "INSERT INTO users_auth (id, hash) VALUES (7, 'example-key-7')");
    mysql(srv, "INSERT INTO users_messages (id, event, message) VALUES (7, 'greeting', '{\"text\":\"hi\"}')");
    await p.fill('#user-id', '7');
    await p.fill('#user-key', 'example-key-7');
    await p.click('#login button');
    await until('connected as user 7', async () => (await p.textContent('#status')) === 'connected, user 7');
    await until('private message shown', async () => (await p.textContent('#log')).includes('private / greeting (was waiting while offline): {"text":"hi"}'));
  } finally {
    site.close();
    await srv.stop();
  }
});
