// Shared by the Node.js test suites (tests/browser, tests/node): start the
// real comet binary on free loopback ports, and wait for a condition.
// Plain ES module with no dependencies, imported by relative path.
import { execSync, spawn } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import net from 'node:net';

/** The comet binary under test (COMET_BIN, else the debug build). */
export const BIN = process.env.COMET_BIN || new URL('../../target/debug/comet', import.meta.url).pathname;

/** A free TCP port on 127.0.0.1 (closed again before it is returned). */
export async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

/**
 * Starts comet with `password` on the given (or free) ports and resolves
 * once it listens. `stop()` kills it and resolves when it has exited.
 */
export async function startComet({ password, ports, extraArgs = [] }) {
  const front = ports?.front ?? (await freePort());
  const back = ports?.back ?? (await freePort());
  const api = ports?.api ?? (await freePort());
  const child = spawn(BIN, ['--frontend', `127.0.0.1:${front}`, '--backend', `127.0.0.1:${back}`,
    '--api', `127.0.0.1:${api}`, '--shards', '2', '--password', password, '--ephemeral', ...extraArgs],
  { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`comet did not start:\n${log}`)), 15000);
    child.stderr.on('data', (d) => {
      log += d;
      if (log.includes('frontend listening on')) { clearTimeout(t); resolve(); }
    });
    child.on('exit', (code) => { clearTimeout(t); reject(new Error(`comet exited ${code}:\n${log}`)); });
  });
  child.removeAllListeners('exit');
  return {
    child, front, back, api, base: `http://127.0.0.1:${front}`, apiBase: `http://127.0.0.1:${api}`,
    stop: () => new Promise((r) => { child.once('exit', r); child.kill('SIGKILL'); }),
  };
}

/** Polls `fn` every 50 ms until it returns a truthy value, or fails after `ms`. */
export async function until(what, fn, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * A comet WebSocket client on `port` (Node 20's global WebSocket is behind
 * a flag, so a tiny one): `params` are the connection's URL parameters
 * (anonymous by default); it subscribes to `channel` when given. Every
 * message received is pushed onto `messages`.
 */
export async function subscriber(port, channel, params = 'sesion=&myid=&devid=0&v=4.08&uuid=node') {
  const sock = net.connect(port, '127.0.0.1');
  await new Promise((r) => sock.once('connect', r));
  sock.write(`GET /ws/${params} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
    'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n');
  let buf = Buffer.alloc(0);
  const messages = [];
  let headDone = false;
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    if (!headDone) {
      const i = buf.indexOf('\r\n\r\n');
      if (i < 0) return;
      buf = buf.subarray(i + 4);
      headDone = true;
    }
    for (;;) {
      if (buf.length < 2) return;
      let len = buf[1] & 0x7f, off = 2;
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
      if (buf.length < off + len) return;
      if ((buf[0] & 0x0f) === 1) messages.push(JSON.parse(buf.subarray(off, off + len).toString()));
      buf = buf.subarray(off + len);
    }
  });
  if (channel) {
    const text = Buffer.from(`subscription\n${channel}`);
    const mask = Buffer.from([1, 2, 3, 4]);
    sock.write(Buffer.concat([Buffer.from([0x81, 0x80 | text.length]), mask, Buffer.from(text.map((b, i) => b ^ mask[i % 4]))]));
  }
  return { messages, close: () => sock.destroy() };
}

// A throwaway CA and a localhost certificate it signed, made with the
// openssl command line in a new temp dir (returned): ca.pem, chain.pem
// (server certificate then CA), key.pem and srv.pem.
export function makeTestCa(name) {
  const dir = mkdtempSync(join(tmpdir(), `comet-${name}-tls-`));
  const ec = 'ec -pkeyopt ec_paramgen_curve:P-256';
  for (const cmd of [
    `openssl req -x509 -newkey ${ec} -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=comet-${name}-ca`,
    `openssl req -newkey ${ec} -nodes -keyout key.pem -out srv.csr -subj /CN=localhost`,
    "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > ext",
    'openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out srv.pem',
    'cat srv.pem ca.pem > chain.pem',
  ]) execSync(cmd, { cwd: dir, stdio: 'pipe' });
  return dir;
}
