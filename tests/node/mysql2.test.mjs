// CometQL through Node.js's mysql2 driver, the way a Node backend talks to
// comet: text queries with client-side placeholders, and execute() with
// server-side prepared statements. The server is the real binary; a
// subscriber on the WebSocket side checks what arrives.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import mysql from 'mysql2/promise';
import { startComet, subscriber as wsSubscriber, until } from '../js/harness.mjs';

let srv;

before(async () => { srv = await startComet({ password: 'nodepw' }); });
after(() => srv?.stop());

const subscriber = (channel) => wsSubscriber(srv.front, channel);
const connect = () => mysql.createConnection({ host: '127.0.0.1', port: srv.back, user: 'root', password: 'nodepw', database: 'CometQL_v1' });

test('text queries with client-side placeholders publish and read', async () => {
  const sub = await subscriber('node_chan');
  const c = await connect();
  try {
    await until('subscribed', async () => (await c.query("SELECT users FROM pipes WHERE name = 'node_chan'"))[0][0]?.users === '1');
    const [r] = await c.query('INSERT INTO pipes_messages (name, event, message) VALUES (?, ?, ?)', ['node_chan', 'ev', JSON.stringify({ text: "it's \"here\"" })]);
    assert.equal(r.affectedRows, 1);
    const m = await until('delivery', () => sub.messages.find((x) => x.pipe === 'node_chan'));
    assert.deepEqual(JSON.parse(m.data), { text: "it's \"here\"" });
    const [tables] = await c.query('SHOW TABLES');
    assert.equal(tables.length, 9);
  } finally { sub.close(); await c.end(); }
});

test('execute() uses server-side prepared statements', async () => {
  const c = await connect();
  try {
    const [a] = await c.execute('INSERT INTO users_auth (id, hash) VALUES (?, ?)', [12, 'k12']);
    assert.equal(a.affectedRows, 1);
    assert.equal(a.insertId, 12);
    const [rows] = await c.execute('SELECT id, hash FROM users_auth WHERE id IN (?, ?)', [12, 13]);
    assert.deepEqual(rows, [{ id: '12', hash: 'k12' }]);
    const [t] = await c.execute('SELECT id, time FROM users_time WHERE id = ?', [12]);
    assert.deepEqual(t, [{ id: '12', time: '-1' }]);
    const [m] = await c.execute('INSERT INTO users_messages (id, event, message) VALUES (?, ?, ?)', [12, 'hello', 'queued for later']);
    assert.equal(m.affectedRows, 1);
    const [q] = await c.execute('SELECT message FROM users_messages WHERE id = ?', [12]);
    assert.deepEqual(q, [{ message: 'queued for later' }]);
    await assert.rejects(c.execute('INSERT INTO pipes_messages VALUES (?, ?, ?)', ['bad name', 'e', 'm']), (e) => e.errno === 12 && /'bad name'/.test(e.message));
  } finally { await c.end(); }
});
