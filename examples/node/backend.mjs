// A Node.js backend talking to comet over CometQL with mysql2.
//
// It does the three things an application backend does:
//   1. authorizes a user: stores the key the user's browser will connect with;
//   2. sends that user a private message (to every open tab, or queued);
//   3. publishes a message on a public channel.
//
// Settings come from the environment (defaults in brackets):
//   COMET_HOST [127.0.0.1]  COMET_PORT [3300]  COMET_PASSWORD [comet]
//   USER_ID [7]  USER_KEY [a random one]  CHANNEL [news]
import { randomBytes } from 'node:crypto';
import mysql from 'mysql2/promise';

const env = (name, fallback) => process.env[name] || fallback;
const userId = Number(env('USER_ID', '7'));
const userKey = env('USER_KEY', randomBytes(16).toString('hex'));
const channel = env('CHANNEL', 'news');

// CometQL is the MySQL protocol: log in as "root" (dev_id 0) to CometQL_v1.
const db = await mysql.createConnection({
  host: env('COMET_HOST', '127.0.0.1'),
  port: Number(env('COMET_PORT', '3300')),
  user: 'root',
  password: env('COMET_PASSWORD', 'comet'),
  database: 'CometQL_v1',
});

// 1. The browser connects with myid=<userId>&sesion=<userKey>.
//    execute() uses a server-side prepared statement; query() works too.
await db.execute('INSERT INTO users_auth (id, hash) VALUES (?, ?)', [userId, userKey]);
console.log(`authorized user ${userId} with key ${userKey}`);

// 2. A private message: comet.js delivers it to subscribers of "msg".
//    affectedRows: 1 when delivered or queued for an offline user.
let text = JSON.stringify({ text: 'Hello from Node', from: 'node' });
let [res] = await db.execute('INSERT INTO users_messages (id, event, message) VALUES (?, ?, ?)', [userId, 'greeting', text]);
console.log(`private message to user ${userId}: affected ${res.affectedRows}`);

// 3. A channel message: affectedRows = connections it was written to.
text = JSON.stringify({ headline: 'comet examples ran', from: 'node' });
[res] = await db.execute('INSERT INTO pipes_messages (name, event, message) VALUES (?, ?, ?)', [channel, 'update', text]);
console.log(`published to ${channel}: written to ${res.affectedRows} connections`);

await db.end();
