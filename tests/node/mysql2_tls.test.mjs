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
import { startComet, makeTestCa } from '../js/harness.mjs';

let dir;
let srv;
let strict;

before(async () => {
  dir = makeTestCa('node');
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
