// comet.js and the demo page over wss:// and https:// in headless Chromium,
// against a comet with --tls-cert. The test makes a CA and a localhost
// certificate with the openssl command line, and Chromium trusts that
// certificate's key by its SPKI hash (--ignore-certificate-errors-spki-list),
// not by turning certificate checks off.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execSync, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { startComet, until, makeTestCa } from '../js/harness.mjs';

const PASSWORD = 'browserpw';
let dir;
let browser;
let srv;

before(async () => {
  dir = makeTestCa('browser');
  const spki = execSync('openssl x509 -in srv.pem -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64', { cwd: dir }).toString().trim();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic', '--no-first-run',
      `--ignore-certificate-errors-spki-list=${spki}`],
  });
  srv = await startComet({ password: PASSWORD, extraArgs: ['--tls-cert', join(dir, 'chain.pem'), '--tls-key', join(dir, 'key.pem')] });
});

after(async () => {
  await browser?.close();
  await srv?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const origin = () => `https://localhost:${srv.front}`;

async function page() {
  const p = await (await browser.newContext()).newPage();
  p.on('pageerror', (e) => console.error('page error:', e));
  await p.goto(`${origin()}/info`);
  await p.addScriptTag({ url: `${origin()}/comet.js` });
  await p.evaluate(() => {
    window.got = [];
    window.record = (name) => CometServer().subscription(name, (e) => window.got.push({ name, data: e.data }));
  });
  return p;
}

const received = (p, name) => p.evaluate((n) => window.got.filter((g) => g.name === n), name);

async function metric(p, name) {
  const body = await p.evaluate(async () => (await fetch('/metrics')).text());
  return body.split('\n').filter((x) => x.startsWith(`${name}{`)).reduce((s, x) => s + Number(x.split(' ').pop()), 0);
}

test('comet.js on an https page connects over wss, chats and gets backend pushes', async () => {
  const a = await page();
  const b = await page();
  for (const p of [a, b]) {
    await p.evaluate(() => { record('web_tls.message'); record('tls_news.update'); CometServer().start({}); });
  }
  await until('both subscribed', () => a.evaluate(() => new Promise((r) => CometServer().count_users_in_pipe('web_tls', (e) => r(e.data.user_in_pipe === 2)))));
  await a.evaluate(() => CometServer().web_pipe_send('web_tls', 'message', { text: 'over wss' }));
  const got = await until('b receives', async () => (await received(b, 'web_tls.message'))[0]);
  assert.deepEqual(got.data, { text: 'over wss' });
  execFileSync('mysql', ['-h', '127.0.0.1', '-P', String(srv.back), '-u', 'root', `-p${PASSWORD}`,
    '--ssl-ca', join(dir, 'ca.pem'), '-e', "INSERT INTO pipes_messages (name, event, message) VALUES ('tls_news', 'update', '{\"n\":1}')"]);
  for (const p of [a, b]) {
    const m = await until('push', async () => (await received(p, 'tls_news.update'))[0]);
    assert.deepEqual(m.data, { n: 1 });
  }
  assert.ok(await metric(a, 'comet_tls_handshakes_total') >= 2);
  assert.equal(await metric(a, 'comet_websockets'), 2, 'two wss connections');
});

test('the demo page loads over https', async () => {
  const p = await (await browser.newContext()).newPage();
  const resp = await p.goto(`${origin()}/`);
  assert.equal(resp.status(), 200);
  assert.equal(new URL(p.url()).protocol, 'https:');
  assert.ok((await p.content()).includes('comet.js'));
});
