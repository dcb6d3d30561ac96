// Shared by the Node.js test suites (tests/browser, tests/node): start the
// real comet binary on free loopback ports, and wait for a condition.
// Plain ES module with no dependencies, imported by relative path.
import { spawn } from 'node:child_process';
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
  const child = spawn(BIN, ['--frontend', `127.0.0.1:${front}`, '--backend', `127.0.0.1:${back}`,
    '--shards', '2', '--password', password, '--ephemeral', ...extraArgs], { stdio: ['ignore', 'ignore', 'pipe'] });
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
    child, front, back, base: `http://127.0.0.1:${front}`,
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
