// CometQL over TLS through Node.js's mysql2 driver (`ssl: { ca }`, the
// server's certificate verified against a CA this test makes with the
// openssl command line), and --backend-require-tls refusing a plaintext
// login with ERR 3159.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mysql from 'mysql2/promise';
import { startComet } from '../js/harness.mjs';

let dir;
let srv;
let strict;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'comet-node-tls-'));
  const ec = 'ec -pkeyopt ec_paramgen_curve:P-256';
  for (const cmd of [
    `openssl req -x509 -newkey ${ec} -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=comet-node-ca`,
    `openssl req -newkey ${ec} -nodes -keyout key.pem -out srv.csr -subj /CN=localhost`,
    "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > ext",
    'openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out srv.pem',
    'cat srv.pem ca.pem > chain.pem',
  ]) execSync(cmd, { cwd: dir, stdio: 'pipe' });
  const tls = ['--tls-cert', join(dir, 'chain.pem'), '--tls-key', join(dir, 'key.pem')];
  srv = await startComet({ password: 'nodepw', extraArgs: tls });
  strict = await startComet({ password: 'nodepw', extraArgs: [...tls, '--backend-require-tls'] });
});
after(async () => {
  await srv?.stop();
  await strict?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const connect = (port, ssl) => mysql.createConnection({
  host: 'localhost', port, user: 'root', password: 'nodepw', database: 'CometQL_v1', ssl,
});

test('mysql2 logs in over TLS and queries', async () => {
  const c = await connect(srv.back, { ca: readFileSync(join(dir, 'ca.pem')) });
  try {
    assert.equal(c.connection.stream.encrypted, true, 'the connection is TLS');
    const [tables] = await c.query('SHOW TABLES');
    assert.equal(tables.length, 9);
    const [r] = await c.execute('INSERT INTO users_auth (id, hash) VALUES (?, ?)', [21, 'k21']);
    assert.equal(r.affectedRows, 1);
  } finally { await c.end(); }
});

test('--backend-require-tls refuses a plaintext login with 3159 and takes a TLS one', async () => {
  await assert.rejects(connect(strict.back, undefined), (e) => e.errno === 3159 && /insecure transport/.test(e.message));
  const c = await connect(strict.back, { ca: readFileSync(join(dir, 'ca.pem')) });
  try {
    const [rows] = await c.query('SHOW TABLES');
    assert.equal(rows.length, 9);
  } finally { await c.end(); }
});
