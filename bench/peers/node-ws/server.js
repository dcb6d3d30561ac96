// A Node.js push-server peer for comet-bench, using the `ws` package: the
// same channel fan-out as comet's, in the idiomatic Node way. WebSocket
// subscribers at /sub/CHANNEL; HTTP publisher at POST /pub/CHANNEL, which
// answers with the number of subscribers written to.
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.env.PORT || 8091);
const channels = new Map(); // channel -> Set of sockets
const NAME = /^\/(sub|pub)\/([A-Za-z0-9_-]+)$/;

const server = http.createServer((req, res) => {
  const m = NAME.exec(req.url);
  if (!m || m[1] !== 'pub' || req.method !== 'POST') {
    res.writeHead(404, { 'content-type': 'text/plain', 'content-length': 10 });
    res.end('not found\n');
    return;
  }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const msg = Buffer.concat(chunks).toString();
    const subs = channels.get(m[2]);
    let n = 0;
    if (subs) {
      for (const ws of subs) {
        if (ws.readyState === 1) { ws.send(msg); n++; }
      }
    }
    const body = String(n);
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  });
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, clientTracking: false });
server.on('upgrade', (req, socket, head) => {
  const m = NAME.exec(req.url);
  if (!m || m[1] !== 'sub') { socket.destroy(); return; }
  wss.handleUpgrade(req, socket, head, (ws) => {
    let set = channels.get(m[2]);
    if (!set) { set = new Set(); channels.set(m[2], set); }
    set.add(ws);
    ws.on('close', () => { set.delete(ws); if (set.size === 0) channels.delete(m[2]); });
    ws.on('error', () => {});
  });
});

server.keepAliveTimeout = 0;
server.listen(port, '127.0.0.1', () => console.log(`node-ws peer listening on 127.0.0.1:${port}`));
