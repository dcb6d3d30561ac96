/*!
 * comet.js — the browser client of the comet push server.
 *
 * API-compatible with the CometServer JavaScript API (CometServerApi.js 4.x):
 * CometServer().start({...}), subscription(), web_pipe_send(), isAuthorized()...
 * No dependencies, no build step. One WebSocket per browser: tabs of the same
 * origin elect a leader (Web Locks) that holds the socket and relays to the
 * others over a BroadcastChannel; when the leader tab closes another takes over.
 * MIT licence.
 */
(function (root) {
  'use strict';

  var API_VERSION = '4.08';
  var BACKOFF_BASE_MS = 500;
  var BACKOFF_CAP_MS = 30000;
  // Longest Retry-After honoured, and the wait after a 4029 (rate limit).
  var RETRY_AFTER_CAP_MS = 300000;
  var RATE_CLOSE_WAIT_MS = 10000;
  // Longest channel list (encoded) put in the connection URL: beyond it the
  // list goes in a `subscription` message after serverInfo, as before, so
  // URLs stay well within what proxies in front of the server accept.
  var URL_CHANNELS_MAX = 1024;

  // The host that served this script is the default node, not a SaaS host.
  var scriptHost = (function () {
    try {
      var s = root.document && root.document.currentScript;
      if (s && s.src) { return new URL(s.src, root.location.href).host; }
    } catch (e) { /* not a browser */ }
    return root.location ? root.location.host : '';
  })();

  function randomId(n) {
    var chars = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
    var out = '';
    var bytes = new Uint8Array(n);
    (root.crypto || {}).getRandomValues ? root.crypto.getRandomValues(bytes) : bytes.forEach(function (_, i) { bytes[i] = Math.random() * 256; });
    for (var i = 0; i < n; i++) { out += chars[bytes[i] % chars.length]; }
    return out;
  }

  function storedUuid() {
    try {
      var u = root.localStorage.getItem('comet_uuid');
      if (!u || !/^[A-Za-z0-9_-]{1,32}$/.test(u)) { u = randomId(16); root.localStorage.setItem('comet_uuid', u); }
      return u;
    } catch (e) { return randomId(16); }
  }

  // Message data is the publisher's text; parse it when it is JSON text.
  function parseData(d) {
    if (typeof d !== 'string') { return d; }
    var c = d.charAt(0);
    if (c === '{' || c === '[') { try { return JSON.parse(d); } catch (e) { /* keep text */ } }
    return d;
  }

  // A subscription name: "chan", "chan.event", "msg", "msg.event", "#chan", "".
  function parseName(name) {
    name = String(name);
    if (name === '') { return { all: true }; }
    if (name.charAt(0) === '#') { return { pipe: '_answer_to_' + name.slice(1), report: true, channel: null }; }
    var dot = name.indexOf('.');
    var pipe = dot < 0 ? name : name.slice(0, dot);
    var event = dot < 0 ? null : name.slice(dot + 1);
    return { pipe: pipe, event: event, channel: pipe === 'msg' ? null : pipe };
  }

  // Retry-After: delay-seconds or an HTTP date; 0 when absent or unreadable.
  function retryAfterMs(h) {
    if (!h) { return 0; }
    var ms = /^\s*\d+\s*$/.test(h) ? Number(h) * 1000 : Date.parse(h) - Date.now();
    return ms > 0 ? Math.min(ms, RETRY_AFTER_CAP_MS) : 0;
  }

  /** One client; `CometServer()` returns the shared one. */
  function CometServerApi() {
    this.opts = {};
    this.subs = {};          // id -> {spec, cb}
    this.nextSub = 1;
    this.answers = {};       // marker -> callback
    this.nextMarker = 1;
    this.authorized = undefined;
    this.authSuccess = [];
    this.authFail = [];
    this.connected = false;
    this.sendQueue = [];
    this.ws = null;
    this.attempt = 0;
    this.nodeIndex = -1;     // position in opts.nodes of the node in use
    this.timer = null;
    this.stopped = true;
    this.noReconnect = false;
    this.tab = randomId(8);
    this.role = 'none';      // 'leader' | 'follower' | 'solo' | 'none'
    this.bc = null;
    this.lockRelease = null;
    this.peerChannels = {};  // follower tab -> [channels] (leader only)
    this.uuid = null;
    this.urlChannels = null; // the channel list the current socket's URL carried
    var self = this;
    this.onOnline = function () { if (!self.stopped && !self.connected && self.role !== 'follower') { self.connectNow(); } };
  }

  var P = CometServerApi.prototype;

  /** Starts (or restarts with new options) the client. */
  P.start = function (opts) {
    opts = opts || {};
    if (!this.stopped) { this.stop(); }
    this.opts = {
      dev_id: opts.dev_id | 0,
      user_id: opts.user_id || 0,
      user_key: opts.user_key || '',
      node: opts.node || null,
      nodes: opts.nodes || null,
      wss: opts.wss !== undefined ? !!opts.wss : (root.location && root.location.protocol === 'https:'),
      roundrobin: !!opts.roundrobin,
      nostat: !!opts.nostat
    };
    this.uuid = opts.uuid || storedUuid();
    this.nodeIndex = -1;
    this.stopped = false;
    this.noReconnect = false;
    this.setAuthorized(undefined);
    if (root.addEventListener) { root.addEventListener('online', this.onOnline); }
    this.elect();
    return true;
  };

  P.restart = function (opts) {
    var o = Object.assign({}, this.opts, opts || {});
    this.stop();
    return this.start(o);
  };

  /** Closes the socket (or leaves the tab group) and stops reconnecting. */
  P.stop = function () {
    this.stopped = true;
    clearTimeout(this.timer);
    if (root.removeEventListener) { root.removeEventListener('online', this.onOnline); }
    if (this.bc) {
      try { this.bc.postMessage({ t: 'bye', tab: this.tab }); } catch (e) { /* closed */ }
      this.bc.close();
      this.bc = null;
    }
    if (this.lockRelease) { this.lockRelease(); this.lockRelease = null; }
    if (this.ws) { var ws = this.ws; this.ws = null; try { ws.close(1000); } catch (e) { /* closed */ } }
    this.role = 'none';
    this.setConnected(false);
  };

  P.groupName = function () {
    var o = this.opts;
    return 'comet:' + (o.node || scriptHost) + ':' + o.dev_id + ':' + o.user_id + ':' + o.user_key;
  };

  // Leader election: the holder of a Web Lock owns the socket; the others
  // relay through a BroadcastChannel and queue for the lock.
  P.elect = function () {
    var self = this;
    var locks = root.navigator && root.navigator.locks;
    if (!locks || typeof root.BroadcastChannel !== 'function') { this.role = 'solo'; this.connectNow(); return; }
    var name = this.groupName();
    this.bc = new root.BroadcastChannel(name);
    this.bc.onmessage = function (ev) { self.onPeer(ev.data); };
    var acquired = function () {
      if (self.stopped) { return undefined; }
      return new Promise(function (resolve) {
        self.lockRelease = resolve;
        self.role = 'leader';
        self.peerChannels = {};
        self.bc.postMessage({ t: 'leader', tab: self.tab });
        self.connectNow();
      });
    };
    locks.request(name, { ifAvailable: true }, function (lock) {
      if (lock) { return acquired(); }
      self.role = 'follower';
      self.bc.postMessage({ t: 'hello', tab: self.tab });
      self.bc.postMessage({ t: 'subs', tab: self.tab, channels: self.localChannels() });
      locks.request(name, acquired);
      return undefined;
    });
  };

  P.onPeer = function (m) {
    if (!m || this.stopped) { return; }
    if (this.role === 'leader') {
      if (m.t === 'hello') {
        this.bc.postMessage({ t: 'state', connected: this.connected, authorized: this.authorized, to: m.tab });
      } else if (m.t === 'subs') {
        this.peerChannels[m.tab] = m.channels;
        this.sendSubscriptions();
      } else if (m.t === 'bye') {
        delete this.peerChannels[m.tab];
        this.sendSubscriptions();
      } else if (m.t === 'send') {
        this.rawSend(m.text, m.tab);
      }
    } else if (this.role === 'follower') {
      if (m.t === 'msg') {
        this.dispatch(m.raw);
      } else if (m.t === 'local' && m.except !== this.tab) {
        this.dispatch(m.raw);
      } else if (m.t === 'state' && (!m.to || m.to === this.tab)) {
        this.setConnected(!!m.connected);
        if (m.authorized !== undefined) { this.setAuthorized(m.authorized); }
      } else if (m.t === 'leader') {
        this.bc.postMessage({ t: 'subs', tab: this.tab, channels: this.localChannels() });
        var q = this.sendQueue; this.sendQueue = [];
        for (var i = 0; i < q.length; i++) { this.bc.postMessage({ t: 'send', text: q[i], tab: this.tab }); }
      }
    }
  };

  P.url = function () {
    var o = this.opts;
    var node = o.node || scriptHost;
    if (o.nodes && o.nodes.length) {
      // The first node: at random (the first of the list with roundrobin).
      // It is kept while it serves; failover moves to the next one.
      if (this.nodeIndex < 0 || this.nodeIndex >= o.nodes.length) {
        this.nodeIndex = o.roundrobin ? 0 : Math.floor(Math.random() * o.nodes.length);
      }
      node = o.nodes[this.nodeIndex];
    }
    var q = 'sesion=' + encodeURIComponent(o.user_key) + '&myid=' + encodeURIComponent(o.user_id || '') +
      '&devid=' + o.dev_id + '&v=' + API_VERSION + '&uuid=' + encodeURIComponent(this.uuid) + '&api=js';
    // Channels already wanted join with the handshake (a comet extension):
    // no `subscription` message after serverInfo, one round trip less.
    // urlChannels: the set the URL carried, as a sorted key ('' for none:
    // the server starts with an empty set, nothing to send), or null when
    // the list was too long for the URL and goes by message.
    var wanted = this.wantedChannels();
    var enc = encodeURIComponent(wanted.join(','));
    this.urlChannels = null;
    if (!wanted.length) {
      this.urlChannels = '';
    } else if (enc.length <= URL_CHANNELS_MAX) {
      q += '&subscription=' + enc;
      this.urlChannels = channelsKey(wanted);
    }
    this.node = node;
    return (o.wss ? 'wss://' : 'ws://') + node + '/ws/' + q;
  };

  P.connectNow = function () {
    var self = this;
    clearTimeout(this.timer);
    if (this.stopped || this.ws) { return; }
    var ws;
    try { ws = new root.WebSocket(this.url()); } catch (e) { this.scheduleReconnect(); return; }
    this.ws = ws;
    var opened = false;
    var node = this.node;
    ws.onopen = function () {
      if (self.ws !== ws) { return; }
      opened = true;
      self.attempt = 0;
      self.setConnected(true);
      // The URL carried the channels: send them only if the set changed
      // while the socket was opening.
      if (self.urlChannels !== channelsKey(self.wantedChannels())) { self.sendSubscriptions(); }
      var q = self.sendQueue; self.sendQueue = [];
      for (var i = 0; i < q.length; i++) { ws.send(q[i]); }
    };
    ws.onmessage = function (ev) {
      if (self.ws !== ws) { return; }
      if (self.role === 'leader' && self.bc) { self.bc.postMessage({ t: 'msg', raw: ev.data }); }
      self.dispatch(ev.data);
    };
    ws.onclose = function (ev) {
      if (self.ws !== ws) { return; }
      self.ws = null;
      self.setConnected(false);
      // The node closed or could not be reached: with a node list, the
      // next attempt goes to the next node (a node that died, or is
      // shutting down, is not asked again first).
      if (ev.code !== 1000) { self.nextNode(); }
      // 4009: replaced by a newer device; 44xx: fatal server errors.
      if (ev.code === 4009 || (ev.code >= 4400 && ev.code < 4500)) { self.noReconnect = true; }
      // 4029: this client sent over the rate for seconds; come back slowly.
      if (ev.code === 4029) { self.scheduleReconnect(RATE_CLOSE_WAIT_MS); return; }
      // Never opened: the upgrade may have been refused with 503 or 429
      // and Retry-After, which a WebSocket cannot see; ask the same node.
      if (!opened) { self.probe(node); return; }
      self.scheduleReconnect();
    };
    ws.onerror = function () { /* onclose follows */ };
  };

  // Failover: the next node of opts.nodes, if there is a list.
  P.nextNode = function () {
    var n = this.opts.nodes;
    if (n && n.length > 1 && this.nodeIndex >= 0) { this.nodeIndex = (this.nodeIndex + 1) % n.length; }
  };

  // After an upgrade that failed: a plain GET of /info on the same node.
  // Refused too, it carries the server's Retry-After (CORS exposes it);
  // answered, the server takes connections again and the usual backoff
  // applies. A node unreachable over HTTP: the usual backoff.
  P.probe = function (node) {
    var self = this;
    if (this.stopped || this.noReconnect) { return; }
    if (!root.fetch || !node) { this.scheduleReconnect(); return; }
    var url = (this.opts.wss ? 'https://' : 'http://') + node + '/info';
    root.fetch(url, { cache: 'no-store', credentials: 'omit' }).then(function (r) {
      var wait = r.status === 503 || r.status === 429 ? retryAfterMs(r.headers.get('Retry-After')) : 0;
      self.scheduleReconnect(wait);
    }, function () { self.scheduleReconnect(); });
  };

  // Exponential backoff with full jitter; with `atLeastMs` (a server's
  // Retry-After), a wait between it and twice it, which spreads a storm of
  // refused clients over that window instead of bringing them back at once.
  P.scheduleReconnect = function (atLeastMs) {
    var self = this;
    if (this.stopped || this.noReconnect || this.ws) { return; }
    var cap = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, this.attempt));
    this.attempt++;
    var wait = atLeastMs > 0 ? atLeastMs * (1 + Math.random()) : Math.random() * cap;
    clearTimeout(this.timer);
    this.timer = setTimeout(function () { self.connectNow(); }, wait);
  };

  P.setConnected = function (c) {
    this.connected = c;
    if (this.role === 'leader' && this.bc) { this.bc.postMessage({ t: 'state', connected: c, authorized: this.authorized }); }
  };

  P.setAuthorized = function (a) {
    var before = this.authorized;
    this.authorized = a;
    if (this.role === 'leader' && this.bc) { this.bc.postMessage({ t: 'state', connected: this.connected, authorized: a }); }
    if (a === before || a === undefined) { return; }
    var list = a ? this.authSuccess : this.authFail;
    for (var i = 0; i < list.length; i++) { try { list[i](); } catch (e) { root.console && console.error(e); } }
  };

  // Channels this tab wants from the server.
  P.localChannels = function () {
    var set = {};
    for (var id in this.subs) {
      var s = this.subs[id].spec;
      if (s.channel) { set[s.channel] = true; }
    }
    return Object.keys(set);
  };

  // Channels the socket must carry: this tab's and, for a leader, its
  // followers', in the order they were asked for (over the server's limit
  // the first ones are kept).
  P.wantedChannels = function () {
    var set = {};
    var own = this.localChannels();
    for (var i = 0; i < own.length; i++) { set[own[i]] = true; }
    for (var t in this.peerChannels) {
      var ch = this.peerChannels[t];
      for (var j = 0; j < ch.length; j++) { set[ch[j]] = true; }
    }
    return Object.keys(set);
  };

  // A channel list as text that two lists in any order compare equal by.
  function channelsKey(list) { return list.slice().sort().join(','); }

  P.sendSubscriptions = function () {
    if (this.role === 'follower') {
      if (this.bc) { this.bc.postMessage({ t: 'subs', tab: this.tab, channels: this.localChannels() }); }
      return;
    }
    if (this.ws && this.connected) { this.ws.send('subscription\n' + this.wantedChannels().join('\n')); }
  };

  // Sends a command now, through the leader, or when connected again.
  P.rawSend = function (text, fromTab) {
    if (this.role === 'follower') {
      if (this.bc) { this.bc.postMessage({ t: 'send', text: text, tab: this.tab }); } else { this.sendQueue.push(text); }
      return;
    }
    if (this.ws && this.connected) { this.ws.send(text); } else { this.sendQueue.push(text); }
    // The server does not echo a web_pipe2 to the connection that sent it,
    // but the browser's other tabs share that connection: give them a copy.
    if (text.indexOf('web_pipe2\n') === 0) {
      var parts = text.split('\n');
      var pipe = parts[1];
      var hidden = pipe.charAt(0) === '@';
      if (hidden) { pipe = pipe.slice(1); }
      var raw = JSON.stringify({ data: parts.slice(4).join('\n'), event: parts[2], pipe: pipe,
        user_id: hidden ? 0 : (this.authorized ? +this.opts.user_id : 0) });
      if (this.bc) { this.bc.postMessage({ t: 'local', raw: raw, except: fromTab || this.tab }); }
      if (fromTab && fromTab !== this.tab) { this.dispatch(raw); }
    }
  };

  P.dispatch = function (raw) {
    var m;
    try { m = JSON.parse(raw); } catch (e) { return; }
    if (!m || typeof m !== 'object') { return; }
    if (m.pipe === 'sys' && m.event === 'serverInfo') {
      // A server that did not read the URL's list (CppComet, an older
      // comet) does not confirm it: send it as a command.
      if (this.ws && this.urlChannels && !m.subscribed) { this.urlChannels = null; this.sendSubscriptions(); }
      this.setAuthorized(!!m.authorized);
      return;
    }
    if (m.pipe === 'sys' && m.event === 'error' && root.console) { console.warn('comet:', m.data && m.data.error); }
    var arg = {
      data: parseData(m.data),
      server_info: { user_id: m.user_id, pipe: m.pipe, event: m.event, history: !!m.history, marker: m.marker, fromQueue: !!m.fromQueue }
    };
    if (m.marker !== undefined && this.answers[m.marker]) {
      var a = this.answers[m.marker];
      if (!m.history) { delete this.answers[m.marker]; }
      try { a(arg); } catch (e) { root.console && console.error(e); }
      if (!m.history) { return; }
    }
    for (var id in this.subs) {
      var s = this.subs[id];
      var sp = s.spec;
      var hit = sp.all || (sp.pipe === m.pipe && (sp.report || !sp.event || sp.event === m.event));
      if (hit) { try { s.cb(arg); } catch (e) { root.console && console.error(e); } }
    }
  };

  /** Subscribes `cb` to one or more names (joined by "\n"); returns an id. */
  P.subscription = function (name, cb) {
    if (typeof cb !== 'function') { return false; }
    var names = String(name).split('\n');
    var ids = [];
    for (var i = 0; i < names.length; i++) {
      var id = 'sub' + (this.nextSub++);
      this.subs[id] = { spec: parseName(names[i]), cb: cb };
      ids.push(id);
    }
    this.sendSubscriptions();
    return ids.join('\n');
  };

  /** Removes a subscription; the last callback of a channel leaves it on the server too. */
  P.unsubscription = function (id) {
    var ids = String(id).split('\n');
    var removed = false;
    for (var i = 0; i < ids.length; i++) {
      if (this.subs[ids[i]]) { delete this.subs[ids[i]]; removed = true; }
    }
    if (removed) { this.sendSubscriptions(); }
    return removed;
  };

  P.unsubscriptionAll = function () { this.subs = {}; this.sendSubscriptions(); };

  /** Publishes from the browser: (pipe, event, msg) or ("pipe.event", msg). */
  P.web_pipe_send = function (pipe, event, msg) {
    if (msg === undefined) {
      msg = event;
      var dot = String(pipe).indexOf('.');
      event = dot < 0 ? 'undefined' : pipe.slice(dot + 1);
      pipe = dot < 0 ? pipe : pipe.slice(0, dot);
    }
    if (typeof msg !== 'string') { msg = JSON.stringify(msg); }
    this.rawSend('web_pipe2\n' + pipe + '\n' + event + '\n*\n' + msg);
    return true;
  };

  P.marker = function (cb) {
    var m = this.tab + '_' + (this.nextMarker++);
    if (typeof cb === 'function') { this.answers[m] = cb; }
    return m;
  };

  /** Asks for a channel's history; entries come to `cb` and to subscribers. */
  P.get_pipe_log = function (pipe, cb) { this.rawSend('pipe_log\n' + pipe + '\n' + this.marker(cb) + '\n'); return true; };

  /** Asks how many connections are subscribed (web_ and track_ channels). */
  P.count_users_in_pipe = function (pipe, cb) { this.rawSend('pipe_count\n' + pipe + '\n' + this.marker(cb) + '\n'); return true; };

  /** Asks who is subscribed to a track_ channel: data is [{user_id, uuid}]. */
  P.getTrackPipeUsers = function (pipe, cb) { this.rawSend('track_pipe_users\n' + pipe + '\n' + this.marker(cb)); return true; };

  /** Asks for a user's data (own user only, unless the server makes it public). */
  P.getUserData = function (userId, cb) { this.rawSend('user_data\n' + this.marker(cb) + '\n' + userId); return true; };

  P.isAuthorized = function () { return this.authorized; };
  P.isConnected = function () { return this.connected; };
  P.getUserId = function () { return this.opts.user_id || 0; };
  P.getUUID = function () { return this.uuid; };
  P.onAuthSuccess = function (cb) { if (typeof cb === 'function') { this.authSuccess.push(cb); } };
  P.onAuthFalill = function (cb) { if (typeof cb === 'function') { this.authFail.push(cb); } };
  P.onAuthFail = P.onAuthFalill;

  var shared = null;
  function CometServer() { if (!shared) { shared = new CometServerApi(); } return shared; }

  root.CometServer = CometServer;
  root.cometServerApi = CometServerApi;
  root.cometApi = CometServer();
})(typeof window !== 'undefined' ? window : this);
