//! In-process simulation of several shard cores, for deterministic tests.
//!
//! [`Sim`] runs N [`ShardCore`]s of one process in one thread with a virtual
//! clock. It plays the I/O layer's part: it feeds bytes to connections,
//! "writes" their queued output into per-connection buffers (or leaves it
//! queued, for a client that does not read), carries out effects, and passes
//! mail between cores only when told to ([`Sim::settle`] passes it until
//! nothing moves; [`Sim::run_local`] keeps it back), so the order in which
//! answers come back can be chosen. No socket, task or real clock is
//! involved, except that a hand-off carries a socket pair end because the
//! mail type moves a real socket.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::ConnId;
use super::conn::Flow;
use super::core::{Effect, ShardCore, Shared};
use super::mail::{Handoff, Mail};
use crate::config::Config;
use crate::mailbox::{self, Inbox};
use crate::metrics::{Registry, ShardMetrics};

/// A simulated client connection: where it lives now (a hand-off moves it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client {
    pub peer: SocketAddr,
}

/// Several cores, a virtual clock, and what each connection was sent.
pub struct Sim {
    pub cores: Vec<ShardCore>,
    inboxes: Vec<Inbox<Mail>>,
    now_ms: u64,
    /// Where each client's connection is: (shard, id).
    at: HashMap<SocketAddr, (usize, ConnId)>,
    /// Bytes written to each client and not yet read by the test.
    received: HashMap<SocketAddr, Vec<u8>>,
    /// Clients whose connection the server closed (or shut for writing).
    pub closed: HashSet<SocketAddr>,
    /// Clients that do not read: their output stays queued.
    stalled: HashSet<SocketAddr>,
    /// Writes made to each client (one per flush of its queue).
    pub writes: HashMap<SocketAddr, usize>,
    next_port: u16,
    /// The storage side, once [`Sim::attach_store`] was called.
    store: Option<Arc<crate::store::writer::Hub>>,
}

/// Unix time the simulation starts at.
const UNIX_START: i64 = 1_800_000_000;

impl Sim {
    /// `shards` cores of one process with `config`.
    pub fn new(shards: usize, config: Config) -> Sim {
        let answers = crate::shard::answer_memory::AnswerMemory::new(config.answer_memory_limit);
        let registry = Arc::new(Registry {
            shards: (0..shards).map(|_| Arc::new(ShardMetrics::default())).collect(),
            io_backend: "sim",
            started: std::time::Instant::now(),
            redis: None,
            answers: Some(answers.clone()),
        });
        let shared = Arc::new(Shared {
            config: Arc::new(config),
            registry,
            shutdown: Arc::new(AtomicBool::new(false)),
            conn_counts: Default::default(),
            backend_conns: Default::default(),
            answers,
            accept_rate: Default::default(),
            auth_failures: Default::default(),
            tls: Default::default(),
        });
        let mut cores = Vec::new();
        let mut inboxes = Vec::new();
        for (i, (outbox, inbox)) in mailbox::mesh(shards, 64).into_iter().enumerate() {
            let mut core = ShardCore::new(i, shards, shared.clone(), outbox);
            core.set_clock(0, UNIX_START);
            cores.push(core);
            inboxes.push(inbox);
        }
        Sim {
            cores,
            inboxes,
            now_ms: 0,
            at: HashMap::new(),
            received: HashMap::new(),
            closed: HashSet::new(),
            stalled: HashSet::new(),
            writes: HashMap::new(),
            next_port: 10_000,
            store: None,
        }
    }

    /// A new client from `ip`, accepted by shard `shard` on the frontend
    /// port (or the backend port); None when it was refused outright.
    pub fn connect_from(&mut self, shard: usize, ip: &str, backend: bool) -> Option<Client> {
        self.next_port += 1;
        let peer: SocketAddr = format!("{ip}:{}", self.next_port).parse().expect("address");
        let core = &mut self.cores[shard];
        let id = if backend {
            core.accept_backend(peer)
        } else {
            match core.accept(peer) {
                crate::shard::conn::Admission::Open(id) => id,
                crate::shard::conn::Admission::AnswerAndClose(_) => return None,
            }
        };
        self.at.insert(peer, (shard, id));
        self.run_local();
        Some(Client { peer })
    }

    /// A new client of the HTTP API port, accepted by shard `shard`.
    pub fn connect_api(&mut self, shard: usize, ip: &str) -> Client {
        self.next_port += 1;
        let peer: SocketAddr = format!("{ip}:{}", self.next_port).parse().expect("address");
        let id = self.cores[shard].accept_api(peer);
        self.at.insert(peer, (shard, id));
        self.run_local();
        Client { peer }
    }

    /// A WebSocket client on shard `shard` that upgraded with `params`;
    /// the 101 head is consumed.
    pub fn websocket(&mut self, shard: usize, params: &str) -> Client {
        let c = self.connect_from(shard, "10.0.0.1", false).expect("admitted");
        self.send(c, upgrade(params).as_bytes());
        self.settle();
        let head = self.take(c);
        let text = String::from_utf8_lossy(&head);
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        let end = text.find("\r\n\r\n").expect("a whole head") + 4;
        self.received.insert(c.peer, head[end..].to_vec());
        c
    }

    /// Where the client's connection lives now.
    pub fn home(&self, c: Client) -> Option<(usize, ConnId)> {
        self.at.get(&c.peer).copied()
    }

    /// Sends bytes from the client (delivered only if the core reads it
    /// now; returns what the core said).
    pub fn send(&mut self, c: Client, bytes: &[u8]) -> Flow {
        let Some((shard, id)) = self.home(c) else {
            return Flow::Gone;
        };
        let core = &mut self.cores[shard];
        if !core.may_read(id) {
            return Flow::Paused;
        }
        let mut data = bytes.to_vec();
        core.work = 0;
        let mut flow = core.readable(id, &mut data);
        while flow == Flow::Yield {
            self.run_local();
            let core = &mut self.cores[shard];
            core.work = 0;
            flow = core.resume(id);
        }
        self.run_local();
        flow
    }

    /// Sends a masked WebSocket text frame.
    pub fn send_text(&mut self, c: Client, text: &str) -> Flow {
        self.send(c, &masked(0x81, text.as_bytes()))
    }

    /// The client closes its connection.
    pub fn hangup(&mut self, c: Client) {
        if let Some((shard, id)) = self.home(c) {
            self.cores[shard].hangup(id);
            self.run_local();
        }
    }

    /// Marks a client as not reading (its output stays queued) or reading.
    pub fn stall(&mut self, c: Client, stalled: bool) {
        if stalled {
            self.stalled.insert(c.peer);
        } else {
            self.stalled.remove(&c.peer);
            if let Some((shard, id)) = self.home(c) {
                self.cores[shard].dirty.push(id);
            }
            self.run_local();
        }
    }

    /// Gives every core a store (`--durability sync`) whose batches complete
    /// only when [`Sim::store_catch_up`] says so.
    pub fn attach_store(&mut self) {
        let bells: Vec<_> = self.cores.iter().map(|_| Arc::new(crate::mailbox::Doorbell::default())).collect();
        let hub = crate::store::writer::Hub::new(&bells, crate::config::Durability::Sync);
        for (i, core) in self.cores.iter_mut().enumerate() {
            let handle = crate::store::writer::StoreHandle::new(&hub, i, usize::MAX);
            core.attach_store(handle, Default::default(), Default::default());
        }
        self.store = Some(hub);
    }

    /// The store has every change sent so far on disk: waiting answers and
    /// offline-queue deliveries go out.
    pub fn store_catch_up(&mut self) {
        if let Some(hub) = &self.store {
            hub.complete_all();
        }
        for core in &mut self.cores {
            core.storage_progress();
        }
        self.settle();
    }

    /// Carries out effects and writes output on every core, passing no mail.
    pub fn run_local(&mut self) {
        for shard in 0..self.cores.len() {
            loop {
                let effects = std::mem::take(&mut self.cores[shard].effects);
                let dirty = std::mem::take(&mut self.cores[shard].dirty);
                if effects.is_empty() && dirty.is_empty() {
                    break;
                }
                for e in effects {
                    self.apply(shard, e);
                }
                for id in dirty {
                    self.write(shard, id);
                }
            }
            self.cores[shard].unpaused = false;
        }
    }

    /// Passes mail between cores (and runs them) until nothing moves.
    pub fn settle(&mut self) {
        loop {
            self.run_local();
            let mut moved = 0;
            for shard in 0..self.cores.len() {
                let mut batch = Vec::new();
                moved += self.inboxes[shard].drain(usize::MAX, |m| batch.push(m));
                for m in batch {
                    self.cores[shard].on_mail(m);
                }
                self.cores[shard].outbox.recheck();
            }
            if moved == 0 {
                self.run_local();
                return;
            }
        }
    }

    /// Moves the virtual clock on by `ms`, ticking every core once per
    /// second crossed, and settles.
    pub fn advance(&mut self, ms: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            // Stop at every `--write-delay` deadline on the way, as the I/O
            // layer's timer does.
            let next_window_end = self.cores.iter_mut().filter_map(|c| c.next_delay_deadline()).min();
            let step = (1000 - self.now_ms % 1000)
                .min(end - self.now_ms)
                .min(next_window_end.map_or(u64::MAX, |at| at.saturating_sub(self.now_ms).max(1)));
            self.now_ms += step;
            for core in &mut self.cores {
                core.set_clock(self.now_ms, UNIX_START + (self.now_ms / 1000) as i64);
                if self.now_ms.is_multiple_of(1000) {
                    core.tick();
                }
                core.end_delay_windows(self.now_ms);
            }
            self.settle();
        }
    }

    fn apply(&mut self, shard: usize, e: Effect) {
        match e {
            Effect::Close(id) => {
                if let Some(peer) = self.peer_of(shard, id) {
                    self.closed.insert(peer);
                    self.at.remove(&peer);
                }
            }
            Effect::HandOff { id, to, peer, head } => {
                self.at.remove(&peer);
                let _ = id;
                let (sock, _other) =
                    socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::STREAM, None).expect("socket pair");
                self.cores[shard].outbox.send(to, Mail::Handoff(Handoff { sock, peer, head, tls: None }));
            }
            // The simulation has no sockets, so no TLS.
            Effect::StartTls { .. } => {}
            Effect::Adopt(h) => {
                let id = self.cores[shard].adopt(h.peer);
                self.cores[shard].adopted_head(id, h.head);
                if self.cores[shard].conns.get(id).is_some() {
                    self.at.insert(h.peer, (shard, id));
                }
            }
        }
    }

    fn peer_of(&self, shard: usize, id: ConnId) -> Option<SocketAddr> {
        self.at.iter().find(|(_, at)| **at == (shard, id)).map(|(p, _)| *p)
    }

    fn write(&mut self, shard: usize, id: ConnId) {
        let Some(peer) = self.peer_of(shard, id) else { return };
        if self.stalled.contains(&peer) {
            return;
        }
        let core = &mut self.cores[shard];
        let Some(conn) = core.conns.get_mut(id) else { return };
        if !conn.out.is_empty() {
            *self.writes.entry(peer).or_default() += 1;
        }
        let out = self.received.entry(peer).or_default();
        while !conn.out.is_empty() {
            let n: usize = conn.out.slices().iter().map(|s| s.len()).sum();
            for s in conn.out.slices() {
                out.extend_from_slice(&s);
            }
            conn.out.advance(n);
        }
        if core.flushed(id) {
            self.closed.insert(peer);
        }
    }

    /// Takes every byte the client was sent so far.
    pub fn take(&mut self, c: Client) -> Vec<u8> {
        self.received.remove(&c.peer).unwrap_or_default()
    }

    /// Takes the whole server frames the client was sent: (opcode, payload).
    pub fn frames(&mut self, c: Client) -> Vec<(u8, Vec<u8>)> {
        let bytes = self.take(c);
        let mut frames = Vec::new();
        let mut p = &bytes[..];
        while p.len() >= 2 {
            let (len, head) = match p[1] & 0x7F {
                126 => (u16::from_be_bytes([p[2], p[3]]) as usize, 4),
                127 => (u64::from_be_bytes(p[2..10].try_into().expect("8 bytes")) as usize, 10),
                n => (n as usize, 2),
            };
            frames.push((p[0] & 0x0F, p[head..head + len].to_vec()));
            p = &p[head + len..];
        }
        frames
    }

    /// The text messages the client was sent, as JSON.
    pub fn messages(&mut self, c: Client) -> Vec<serde_json::Value> {
        self.frames(c)
            .into_iter()
            .filter(|(op, _)| *op == 1)
            .map(|(_, p)| serde_json::from_slice(&p).expect("JSON"))
            .collect()
    }

    /// The close code the client was sent, if any.
    pub fn close_code(&mut self, c: Client) -> Option<u16> {
        self.frames(c).into_iter().find(|(op, _)| *op == 8).map(|(_, p)| u16::from_be_bytes([p[0], p[1]]))
    }
}

/// A WebSocket upgrade request for `/ws/<params>`.
pub fn upgrade(params: &str) -> String {
    format!(
        "GET /ws/{params} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A masked client frame with first byte `first`.
pub fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [9u8, 8, 7, 6];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::home_shard;

    fn config() -> Config {
        Config { shards: 2, ..Config::default() }
    }

    fn anon(uuid: &str) -> String {
        format!("v=4&api=js&uuid={uuid}")
    }

    /// A subscriber of `channel` on `shard`, its serverInfo consumed.
    fn subscriber(sim: &mut Sim, shard: usize, uuid: &str, channel: &str) -> Client {
        let c = sim.websocket(shard, &anon(uuid));
        sim.send_text(c, &format!("subscription\n{channel}"));
        sim.settle();
        let info = sim.messages(c);
        assert_eq!(info[0]["event"], "serverInfo", "{info:?}");
        c
    }

    /// `n` subscribers of `web_hot` on shard 0 and a browser publisher
    /// whose answers were read: the `--write-delay` tests' stage.
    fn hot_channel(sim: &mut Sim, n: usize) -> (Vec<Client>, Client) {
        let subs = (0..n).map(|i| subscriber(sim, 0, &format!("s{i}"), "web_hot")).collect();
        let publisher = sim.websocket(0, &anon("pub"));
        sim.messages(publisher);
        (subs, publisher)
    }

    #[test]
    fn a_publish_reaches_every_subscriber_on_every_shard_once_and_the_report_counts_them() {
        let mut sim = Sim::new(2, config());
        let subs: Vec<Client> = (0..6).map(|i| subscriber(&mut sim, i % 2, &format!("s{i}"), "web_news")).collect();
        let publisher = sim.websocket(0, &anon("pub"));
        sim.messages(publisher);
        sim.send_text(publisher, "web_pipe2\nweb_news\nupdate\n*\nhello");
        // Before mail moves, only shard 0's subscribers have it and the
        // report waits for shard 1's count.
        assert_eq!(sim.messages(subs[0]).len(), 1);
        assert!(sim.messages(subs[1]).is_empty());
        assert!(sim.messages(publisher).is_empty());
        sim.settle();
        for (i, c) in subs.iter().enumerate().skip(1) {
            let m = sim.messages(*c);
            assert_eq!(m.len(), 1, "subscriber {i}: {m:?}");
            assert_eq!(m[0]["data"], "hello");
        }
        let report = sim.messages(publisher);
        assert_eq!(report[0]["data"]["number_messages"], 6, "{report:?}");
    }

    #[test]
    fn a_connection_that_names_a_user_is_handed_to_the_users_home_shard() {
        let mut sim = Sim::new(2, config());
        let user = (1..100).find(|&u| home_shard(0, u, 2) == 1).expect("a user homed on shard 1");
        let c = sim.connect_from(0, "10.0.0.9", false).expect("admitted");
        sim.send(c, upgrade(&format!("v=4&api=js&myid={user}&sesion=nokey&uuid=h")).as_bytes());
        assert_eq!(sim.home(c), None, "in flight between shards");
        assert!(sim.cores[0].conns.is_empty());
        sim.settle();
        let (shard, _) = sim.home(c).expect("adopted");
        assert_eq!(shard, 1);
        let head = sim.take(c);
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        // Counted once in the process's connection counts.
        assert_eq!(sim.cores[0].shared.conn_counts.total(), 1);
    }

    /// `subscription` in the URL: the head alone (one read, no command
    /// after `serverInfo`) makes a subscriber, here of channels on both
    /// shards, and the names are judged as the command judges them.
    #[test]
    fn a_subscription_in_the_upgrade_url_subscribes_with_the_head_alone() {
        let mut sim = Sim::new(2, config());
        let c = sim.connect_from(0, "10.0.0.7", false).expect("admitted");
        let head = b"GET /ws/sesion=&myid=&devid=0&v=4.08&uuid=u7&api=js&subscription=web_a,news,x,private_p,sys \
HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(sim.send(c, head), Flow::Continue);
        let (_, id) = sim.home(c).expect("on shard 0");
        assert_eq!(sim.cores[0].conns.get(id).map(|k| k.subs.len()), Some(2), "web_a and news");
        sim.settle();
        let out = sim.take(c);
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("101 head") + 4;
        assert!(out.starts_with(b"HTTP/1.1 101"));
        sim.received.insert(c.peer, out[end..].to_vec());
        let m = sim.messages(c);
        assert_eq!(m[0]["event"], "serverInfo", "{m:?}");
        let errors: Vec<&str> = m[1..].iter().filter_map(|e| e["data"]["error"].as_str()).collect();
        assert_eq!(errors.len(), 2, "x (too short) and sys (server replies), not private_p: {m:?}");
        assert!(errors[0].contains("'x'") && errors[1].contains("sys"), "{errors:?}");
        let publisher = sim.websocket(1, &anon("pub"));
        sim.messages(publisher);
        sim.send_text(publisher, "web_pipe2\nweb_a\nev\n*\nhello");
        sim.settle();
        let got = sim.messages(c);
        assert_eq!((got.len(), &got[0]["data"]), (1, &serde_json::json!("hello")), "{got:?}");
    }

    #[test]
    fn presence_is_announced_across_shards_and_not_to_the_one_who_joined() {
        let mut sim = Sim::new(2, config());
        let a = subscriber(&mut sim, 0, "a", "track_room");
        let b = subscriber(&mut sim, 1, "b", "track_room");
        let to_a = sim.messages(a);
        assert_eq!(to_a.len(), 1, "{to_a:?}");
        assert_eq!(to_a[0]["event"], "subscription");
        assert_eq!(to_a[0]["data"]["uuid"], "b");
        assert!(sim.messages(b).is_empty(), "no echo of one's own presence");
        // b leaves by closing: a hears it.
        sim.send(b, &masked(0x88, &1000u16.to_be_bytes()));
        sim.settle();
        let to_a = sim.messages(a);
        assert_eq!(to_a[0]["event"], "unsubscription", "{to_a:?}");
    }

    #[test]
    fn cometql_answers_leave_in_query_order_when_gathers_finish_later() {
        use crate::cometql::packet;
        let mut sim = Sim::new(2, config());
        let c = sim.connect_from(0, "10.0.0.5", true).expect("admitted");
        let greeting = sim.take(c);
        // The nonce: 8 bytes after the version string, 12 more later on.
        let g = &greeting[4..];
        let vend = g.iter().position(|&b| b == 0).expect("version");
        let mut nonce = g[vend + 5..vend + 13].to_vec();
        nonce.extend_from_slice(&g[vend + 14 + 2 + 1 + 2 + 2 + 1 + 10..][..12]);
        let scramble = packet::native_scramble(b"comet", &nonce);
        let mut login = Vec::new();
        login.extend_from_slice(&(0x200u32 | 0x8000 | 0x80000).to_le_bytes());
        login.extend_from_slice(&(1u32 << 24).to_le_bytes());
        login.push(45);
        login.extend_from_slice(&[0; 23]);
        login.extend_from_slice(b"root\0");
        login.push(20);
        login.extend_from_slice(&scramble);
        login.extend_from_slice(b"mysql_native_password\0");
        let mut bytes = Vec::new();
        packet::write_packet(&mut bytes, 1, &login);
        sim.send(c, &bytes);
        let ok = sim.take(c);
        assert_eq!(ok[4], 0x00, "login OK");
        // A gather (pipes counts from both shards) then an immediate answer.
        let mut q = Vec::new();
        for text in ["SELECT name, users FROM pipes WHERE name = 'web_x'", "SELECT 'second'"] {
            let mut p = vec![0x03];
            p.extend_from_slice(text.as_bytes());
            packet::write_packet(&mut q, 0, &p);
        }
        sim.send(c, &q);
        assert!(sim.take(c).is_empty(), "the second answer waits for the first");
        sim.settle();
        let answers = String::from_utf8_lossy(&sim.take(c)).into_owned();
        let first = answers.find("web_x").expect("the first answer");
        let second = answers.find("second").expect("the second answer");
        assert!(first < second, "{answers:?}");
    }

    #[test]
    fn http_api_answers_leave_in_request_order_when_gathers_finish_later() {
        let mut sim = Sim::new(2, config());
        let c = sim.connect_api(0, "10.0.0.6");
        // A gather (pipes counts from both shards), an answer needing no
        // shard (an unknown table), then a publish (counted on both).
        let reqs = [
            "GET /api/pipes?name=web_x HTTP/1.1\r\nX-API-Key: comet\r\n\r\n".to_string(),
            "GET /api/nope HTTP/1.1\r\nX-API-Key: comet\r\n\r\n".to_string(),
            {
                let body = r#"{"name":"web_x","event":"e","message":"m"}"#;
                format!(
                    "POST /api/pipes_messages HTTP/1.1\r\nAuthorization: Bearer comet\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            },
        ];
        // Byte by byte: a request split anywhere is reassembled.
        for b in reqs.concat().as_bytes() {
            sim.send(c, std::slice::from_ref(b));
        }
        assert!(sim.take(c).is_empty(), "the later answers wait for the first");
        sim.settle();
        let answers = String::from_utf8_lossy(&sim.take(c)).into_owned();
        let bodies: Vec<&str> =
            answers.split("HTTP/1.1 ").skip(1).map(|a| a.split("\r\n\r\n").nth(1).unwrap()).collect();
        assert_eq!(
            bodies,
            [
                r#"{"rows":[{"name":"web_x","users":0}]}"#,
                r#"{"error":{"code":15,"message":"Table 'nope' doesn't exist"}}"#,
                r#"{"affected":0}"#
            ],
            "{answers}"
        );
    }

    /// One HTTP API POST from `api`, answered (the store keeps up).
    fn api_post(sim: &mut Sim, api: Client, table: &str, body: &str) {
        let req =
            format!("POST /api/{table} HTTP/1.1\r\nX-API-Key: comet\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        sim.send(api, req.as_bytes());
        sim.store_catch_up();
        let answer = String::from_utf8_lossy(&sim.take(api)).into_owned();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[test]
    fn a_live_private_message_never_overtakes_the_offline_queue_waiting_for_the_disk() {
        let mut sim = Sim::new(1, Config { shards: 1, ..config() });
        sim.attach_store();
        let api = sim.connect_api(0, "10.0.0.7");
        api_post(&mut sim, api, "users_auth", r#"{"id":7,"hash":"k7"}"#);
        for i in 0..3 {
            api_post(&mut sim, api, "users_messages", &format!(r#"{{"id":7,"event":"e","message":"queued {i}"}}"#));
        }
        // The user connects: its queue is taken, and goes out once the
        // store has its removal. Meanwhile a live message comes.
        let dev = sim.websocket(0, "v=4&api=js&myid=7&sesion=k7&uuid=d");
        let req = r#"{"id":7,"event":"e","message":"live"}"#;
        let req = format!(
            "POST /api/users_messages HTTP/1.1\r\nX-API-Key: comet\r\nContent-Length: {}\r\n\r\n{req}",
            req.len()
        );
        sim.send(api, req.as_bytes());
        sim.settle();
        let before: Vec<_> =
            sim.messages(dev).into_iter().filter(|m| m["event"] != "serverInfo").map(|m| m["data"].clone()).collect();
        assert!(before.is_empty(), "nothing private before the queue is stored as taken: {before:?}");
        sim.store_catch_up();
        let got: Vec<_> = sim.messages(dev).into_iter().map(|m| m["data"].clone()).collect();
        assert_eq!(got, ["queued 0", "queued 1", "queued 2", "live"], "queue first, in order");
    }

    /// Attack: while a device's offline queue waits for the disk, live
    /// private messages to it wait behind the queue. They are held to
    /// `--outbound-limit` like frames queued for the socket: past it the
    /// device is closed as a slow consumer and what waited is dropped, so a
    /// slow disk cannot make a shard hold more for one device than that.
    #[test]
    fn live_messages_waiting_behind_an_offline_queue_are_held_to_the_outbound_limit() {
        let limit = 8 * 1024;
        let mut sim = Sim::new(1, Config { shards: 1, outbound_limit: limit, ..config() });
        sim.attach_store();
        let api = sim.connect_api(0, "10.0.0.7");
        api_post(&mut sim, api, "users_auth", r#"{"id":7,"hash":"k7"}"#);
        api_post(&mut sim, api, "users_messages", r#"{"id":7,"event":"e","message":"queued"}"#);
        let dev = sim.websocket(0, "v=4&api=js&myid=7&sesion=k7&uuid=d");
        sim.messages(dev);
        // The disk does not answer; messages of 500 bytes come, up to 100.
        let held = |sim: &Sim| -> (usize, usize) {
            sim.cores[0]
                .deferred
                .iter()
                .filter_map(|(_, d)| match d {
                    super::super::core::Deferred::Frames { frames, cost, .. } => Some((frames.len(), *cost)),
                    _ => None,
                })
                .fold((0, 0), |(n, c), (fn_, fc)| (n + fn_, c + fc))
        };
        let closes = |sim: &Sim| sim.cores[0].metrics.slow_consumer_closes.load(std::sync::atomic::Ordering::Relaxed);
        let text = "x".repeat(500);
        let mut most = 0;
        let mut sent_before_close = 0;
        for i in 0..100 {
            let body = format!(r#"{{"id":7,"event":"e","message":"{i} {text}"}}"#);
            let req = format!(
                "POST /api/users_messages HTTP/1.1\r\nX-API-Key: comet\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            sim.send(api, req.as_bytes());
            sim.settle();
            let (n, cost) = held(&sim);
            assert!(cost <= limit, "{cost} bytes held past the {limit}-byte limit after {i} messages");
            most = most.max(n);
            if closes(&sim) > 0 {
                break;
            }
            sent_before_close = i + 1;
        }
        assert_eq!(closes(&sim), 1, "the device went over its limit");
        assert_eq!(held(&sim), (0, 0), "what waited was dropped at the close");
        sim.store_catch_up();
        // (The answer that closed the device waited for the store: its
        // last-online time is stored.)
        let answers = String::from_utf8_lossy(&sim.take(api)).matches("HTTP/1.1 200").count();
        assert_eq!(answers, sent_before_close + 1, "the sender is answered");
        // 1 queued + 15 live frames of about 530 bytes fit in 8 KiB.
        assert!((10..20).contains(&sent_before_close), "closed after {sent_before_close} messages");
        assert!(most > 10, "frames did wait behind the queue ({most})");
        let frames = sim.frames(dev);
        let texts = frames.iter().filter(|(op, _)| *op == 1).count();
        assert_eq!(texts, 0, "nothing that waited went out after the close");
        let close = frames.iter().find(|(op, _)| *op == 8).map(|(_, p)| u16::from_be_bytes([p[0], p[1]]));
        assert_eq!(close, Some(4008), "closed as a slow consumer");
    }

    #[test]
    fn an_idle_http_api_connection_is_closed_and_a_busy_one_is_not() {
        let mut sim = Sim::new(2, config());
        let idle = sim.connect_api(0, "10.0.0.7");
        let busy = sim.connect_api(1, "10.0.0.8");
        let secs = super::super::api::IDLE_TIMEOUT as u64;
        for _ in 0..secs - 1 {
            sim.advance(1000);
            sim.send(busy, b"GET /api/users_time?id=1 HTTP/1.1\r\nX-API-Key: comet\r\n\r\n");
        }
        assert!(!sim.closed.contains(&idle.peer), "still within the idle time");
        assert_eq!(String::from_utf8_lossy(&sim.take(busy)).matches("200 OK").count() as u64, secs - 1);
        sim.advance(2000);
        assert!(sim.closed.contains(&idle.peer), "idle past {secs} s");
        assert!(!sim.closed.contains(&busy.peer), "the busy one was active a second ago");
    }

    #[test]
    fn a_client_over_the_rate_gets_one_error_a_second_and_4029_after_ten_seconds() {
        let mut sim = Sim::new(2, Config { client_rate: 2, ..config() });
        let c = sim.websocket(0, &anon("flood"));
        sim.messages(c);
        let mut errors = 0;
        let mut handled = 0;
        let mut close = None;
        for round in 0..12 {
            let flows: Vec<Flow> = (0..10).map(|_| sim.send_text(c, "web_pipe2\nweb_x\ne\n*\nm")).collect();
            if round == 0 {
                // Within the burst the connection is read on; past it, the
                // I/O layer is told to wait before reading it again.
                assert_eq!(flows[..4], [Flow::Continue; 4]);
                assert_eq!(flows[4..], [Flow::Throttle; 6]);
            }
            sim.settle();
            for (op, payload) in sim.frames(c) {
                match op {
                    8 => close = Some(u16::from_be_bytes([payload[0], payload[1]])),
                    _ if String::from_utf8_lossy(&payload).contains("rate limit") => errors += 1,
                    _ => handled += 1,
                }
            }
            if close.is_some() {
                break;
            }
            sim.advance(1000);
        }
        // A burst of 4, then 2 a second; the 2 admitted in the second of
        // the close are handled but not reported (the connection is closing).
        assert_eq!(handled, 4 + 2 * 9, "delivery reports");
        assert_eq!(errors, 10, "one a second, for seconds 0..9; the 11th second closes");
        assert_eq!(close, Some(4029));
    }

    #[test]
    fn browsers_flooding_one_channel_get_its_rate_and_other_channels_are_untouched() {
        // 20 a second process-wide: each of the 2 shards admits 10, burst 20.
        let mut sim = Sim::new(2, Config { channel_rate: 20, ..config() });
        let subs: Vec<Client> = (0..2).map(|i| subscriber(&mut sim, i, &format!("s{i}"), "web_hot")).collect();
        let calm = subscriber(&mut sim, 1, "calm", "web_calm");
        let publishers: Vec<Client> = (0..10).map(|i| sim.websocket(i % 2, &anon(&format!("p{i}")))).collect();
        for &p in &publishers {
            sim.messages(p);
        }
        let mut refused = 0;
        for round in 0..2 {
            for &p in &publishers {
                for _ in 0..10 {
                    sim.send_text(p, "web_pipe2\nweb_hot\ne\n*\nm");
                }
            }
            sim.send_text(publishers[0], "web_pipe2\nweb_calm\ne\n*\nquiet");
            sim.settle();
            for &p in &publishers {
                refused += sim
                    .frames(p)
                    .iter()
                    .filter(|(_, b)| String::from_utf8_lossy(b).contains("rate limit: channel web_hot"))
                    .count();
            }
            // The first round drains both bursts (20 + 20); a second
            // later each shard has 10 more.
            let want = if round == 0 { 40 } else { 20 };
            for &c in &subs {
                assert_eq!(sim.messages(c).len(), want, "round {round}");
            }
            let m = sim.messages(calm);
            assert_eq!((m.len(), &m[0]["data"]), (1, &serde_json::json!("quiet")), "round {round}");
            sim.advance(1000);
        }
        assert_eq!(refused, 200 - 60);
    }

    #[test]
    fn a_browser_event_name_longer_than_cometqls_is_refused() {
        let mut sim = Sim::new(2, config());
        let sub = subscriber(&mut sim, 1, "s", "web_ev");
        let p = sim.websocket(0, &anon("p"));
        sim.messages(p);
        sim.send_text(p, &format!("web_pipe2\nweb_ev\n{}\n*\nm", "e".repeat(65)));
        sim.send_text(p, &format!("web_pipe2\nweb_ev\n{}\n*\nok", "e".repeat(64)));
        sim.settle();
        let to_p = sim.messages(p);
        assert!(to_p.iter().any(|m| m.to_string().contains("longer than 64 characters")), "{to_p:?}");
        let got = sim.messages(sub);
        assert_eq!((got.len(), &got[0]["data"]), (1, &serde_json::json!("ok")), "{got:?}");
    }

    #[test]
    fn an_unfinished_frame_is_closed_with_1008_at_the_message_timeout() {
        let mut sim = Sim::new(2, config());
        let c = sim.websocket(0, &anon("slow"));
        sim.messages(c);
        let frame = masked(0x81, b"subscription\nweb_a");
        sim.send(c, &frame[..5]);
        for _ in 0..9 {
            sim.advance(1000);
            sim.send(c, &[]);
        }
        assert_eq!(sim.close_code(c), None, "still within 10 s");
        sim.advance(1000);
        assert_eq!(sim.close_code(c), Some(1008));
    }

    #[test]
    fn a_client_that_does_not_read_is_closed_at_the_outbound_limit_counting_overhead() {
        let mut sim = Sim::new(1, Config { shards: 1, outbound_limit: 64 * 1024, client_rate: 1_000_000, ..config() });
        let c = sim.websocket(0, &anon("nonreader"));
        sim.messages(c);
        sim.stall(c, true);
        // Pongs of 2 bytes: at 66 bytes each, 993 fit in 64 KiB; the next
        // one closes the connection.
        let closes = |sim: &Sim| sim.cores[0].metrics.slow_consumer_closes.load(std::sync::atomic::Ordering::Relaxed);
        let mut pings = 0;
        while closes(&sim) == 0 && pings < 5000 {
            sim.send(c, &masked(0x89, b""));
            pings += 1;
        }
        assert_eq!(pings, 64 * 1024 / 66 + 1);
        sim.stall(c, false);
        assert_eq!(sim.close_code(c), Some(4008), "the queued pongs were dropped, the close sent");
    }

    #[test]
    fn connections_past_the_limits_are_refused_with_429_then_503() {
        let mut sim = Sim::new(2, Config { max_connections: 3, max_connections_per_ip: 2, ..config() });
        let a = sim.connect_from(0, "10.1.0.1", false).expect("first");
        sim.connect_from(1, "10.1.0.1", false).expect("second");
        let refused = sim.connect_from(0, "10.1.0.1", false).expect("answered");
        assert!(sim.take(refused).starts_with(b"HTTP/1.1 429"));
        sim.connect_from(1, "10.1.0.2", false).expect("third");
        let full = sim.connect_from(0, "10.1.0.3", false).expect("answered");
        assert!(sim.take(full).starts_with(b"HTTP/1.1 503"));
        // Backends are not counted.
        let db = sim.connect_from(0, "10.1.0.3", true).expect("backend");
        assert_eq!(sim.take(db)[4], 10, "a MySQL greeting (protocol 10)");
        // A connection that goes frees its place.
        sim.hangup(a);
        let ok = sim.connect_from(1, "10.1.0.3", false).expect("admitted");
        assert!(sim.take(ok).is_empty(), "no refusal");
    }

    #[test]
    fn new_connections_over_the_accept_rate_get_503_and_the_rate_is_shared_by_the_shards() {
        let mut sim = Sim::new(2, Config { max_accept_rate: 4, ..config() });
        let c = sim.websocket(0, &anon("early"));
        sim.messages(c);
        // The burst is one second's worth, taken from both shards.
        for shard in [1, 0, 1] {
            let ok = sim.connect_from(shard, "10.2.0.1", false).expect("admitted");
            assert!(sim.take(ok).is_empty(), "no refusal");
        }
        for shard in [0, 1] {
            let refused = sim.connect_from(shard, "10.2.0.2", false).expect("answered");
            let head = String::from_utf8(sim.take(refused)).expect("text");
            assert!(head.starts_with("HTTP/1.1 503"), "{head}");
            assert!(head.contains("Retry-After: 2\r\n"), "{head}");
            assert!(head.contains("--max-accept-rate"), "{head}");
        }
        let refused: u64 =
            sim.cores.iter().map(|c| c.metrics.refused_rate.load(std::sync::atomic::Ordering::Relaxed)).sum();
        assert_eq!(refused, 2);
        // A quarter of a second later there is one token again.
        sim.advance(250);
        let ok = sim.connect_from(1, "10.2.0.3", false).expect("admitted");
        assert!(sim.take(ok).is_empty(), "no refusal");
        let again = sim.connect_from(0, "10.2.0.3", false).expect("answered");
        assert!(sim.take(again).starts_with(b"HTTP/1.1 503"));
        // The connected client is served all along.
        sim.send_text(c, "pipe_count\nweb_x\nm\n");
        sim.settle();
        assert_eq!(sim.messages(c)[0]["data"]["user_in_pipe"], 0);
    }

    #[test]
    fn with_a_write_delay_the_messages_of_a_window_reach_each_subscriber_in_one_write() {
        let mut sim = Sim::new(1, Config { shards: 1, write_delay_ms: 20, ..config() });
        let (subs, publisher) = hot_channel(&mut sim, 3);
        let before: Vec<usize> = subs.iter().map(|c| sim.writes.get(&c.peer).copied().unwrap_or(0)).collect();
        for i in 0..3 {
            sim.send_text(publisher, &format!("web_pipe2\nweb_hot\ne\n*\n{i}"));
        }
        sim.settle();
        // Answers to commands are not delayed: the publisher has its reports.
        assert_eq!(sim.messages(publisher).len(), 3);
        assert!(sim.messages(subs[0]).is_empty(), "held for the window");
        assert_eq!(sim.cores[0].delayed.len(), 3, "each subscriber listed once");
        // At most the window and its early margin, from the end of the
        // millisecond (see `shard::delay`).
        sim.advance(24);
        for (c, before) in subs.iter().zip(before) {
            let got: Vec<String> =
                sim.messages(*c).iter().map(|m| m["data"].as_str().unwrap_or_default().to_string()).collect();
            assert_eq!(got, ["0", "1", "2"]);
            assert_eq!(sim.writes[&c.peer], before + 1, "three messages, one write");
        }
        // Without the delay: a write per message.
        let mut sim = Sim::new(1, Config { shards: 1, ..config() });
        let c = subscriber(&mut sim, 0, "s", "web_hot");
        let publisher = sim.websocket(0, &anon("pub"));
        let before = sim.writes[&c.peer];
        for i in 0..3 {
            sim.send_text(publisher, &format!("web_pipe2\nweb_hot\ne\n*\n{i}"));
        }
        sim.settle();
        assert_eq!(sim.writes[&c.peer], before + 3);
    }

    #[test]
    fn with_a_write_delay_an_answer_goes_at_once_and_takes_the_held_messages_along() {
        let mut sim = Sim::new(1, Config { shards: 1, write_delay_ms: 100, ..config() });
        let (subs, publisher) = hot_channel(&mut sim, 8);
        sim.advance(5);
        for i in 0..2 {
            sim.send_text(publisher, &format!("web_pipe2\nweb_hot\ne\n*\n{i}"));
        }
        sim.settle();
        // A subscriber whose first window is still open 2 ms on (its
        // group's is longer than that) asks something.
        sim.advance(2);
        let held = |sim: &Sim, c: Client| {
            sim.home(c).and_then(|(_, id)| sim.cores[0].conns.get(id)).is_some_and(|c| !c.out_is_empty())
        };
        let c = subs.iter().copied().find(|c| held(&sim, *c)).expect("a first window longer than 2 ms");
        let (_, id) = sim.home(c).expect("connected");
        let before = sim.writes[&c.peer];
        sim.send_text(c, "pipe_count\nweb_hot\nm\n");
        sim.settle();
        let got = sim.messages(c);
        let data: Vec<String> = got.iter().map(|m| m["data"].to_string()).collect();
        assert_eq!(got.len(), 3, "{data:?}");
        assert_eq!((got[0]["data"].as_str(), got[1]["data"].as_str()), (Some("0"), Some("1")), "held first: {data:?}");
        assert_eq!(got[2]["data"]["user_in_pipe"], 8, "then the answer: {data:?}");
        assert_eq!(sim.writes[&c.peer], before + 1, "at once, in one write");
        let window = sim.cores[0].conns.get(id).expect("connected").out.window;
        assert!(!super::super::delay::WriteDelay::is_open(window), "the answer ended the window");
        // The next channel message opens a window of its own (whole: the
        // stream goes on), and waits for it.
        sim.advance(1);
        sim.send_text(publisher, "web_pipe2\nweb_hot\ne\n*\n2");
        sim.settle();
        assert!(sim.messages(c).is_empty(), "held for its own window");
        sim.advance(100 + 11 + 1);
        let got = sim.messages(c);
        assert_eq!(got.iter().map(|m| m["data"].as_str()).collect::<Vec<_>>(), [Some("2")]);
        assert_eq!(sim.writes[&c.peer], before + 2);
    }

    #[test]
    fn with_a_write_delay_a_stalled_subscriber_is_closed_at_the_limit_and_the_held_list_stays_bounded() {
        let config = Config {
            shards: 1,
            write_delay_ms: 20,
            outbound_limit: 64 * 1024,
            client_rate: 1000,
            channel_rate: 0,
            ..config()
        };
        let mut sim = Sim::new(1, config);
        let stalled = subscriber(&mut sim, 0, "stalled", "web_hot");
        let reader = subscriber(&mut sim, 0, "reader", "web_hot");
        // A subscriber that asks something every 3 ms: each answer ends its
        // window and the next message opens another.
        let asker = subscriber(&mut sim, 0, "asker", "web_hot");
        let publisher = sim.websocket(0, &anon("pub"));
        sim.messages(publisher);
        sim.stall(stalled, true);
        let closes = |sim: &Sim| sim.cores[0].metrics.slow_consumer_closes.load(std::sync::atomic::Ordering::Relaxed);
        let big = "x".repeat(1000);
        let (mut most_held, mut got) = (0, 0);
        for ms in 0..3000u64 {
            if ms % 10 == 0 {
                sim.send_text(publisher, &format!("web_pipe2\nweb_hot\ne\n*\n{big}"));
            }
            if ms % 3 == 0 {
                sim.send_text(asker, "pipe_count\nweb_hot\nm\n");
            }
            sim.settle();
            most_held = most_held.max(sim.cores[0].delayed.len());
            got += sim.messages(reader).len();
            sim.messages(asker);
            sim.advance(1);
        }
        got += sim.messages(reader).len();
        assert_eq!(got, 300, "the reading subscriber got every message");
        assert_eq!(closes(&sim), 1, "the stalled one was closed at the limit");
        // At most a few entries per connection at any time, however many
        // windows a connection opened and ended (here about 300 each).
        assert!(most_held <= 2 * 3, "{most_held} entries held at most");
    }

    /// What each subscriber got since the last call: (message, ms).
    fn received(sim: &mut Sim, subs: &[Client], got: &mut [Vec<(u64, u64)>]) {
        for (c, got) in subs.iter().zip(got) {
            for m in sim.messages(*c) {
                got.push((m["data"].as_str().and_then(|d| d.parse().ok()).expect("a numbered message"), sim.now_ms));
            }
        }
    }

    #[test]
    fn with_a_write_delay_a_steady_stream_ends_windows_on_arrivals_in_staggered_groups() {
        let mut sim = Sim::new(1, Config { shards: 1, write_delay_ms: 20, ..config() });
        let (subs, publisher) = hot_channel(&mut sim, 64);
        let before: Vec<usize> = subs.iter().map(|c| sim.writes[&c.peer]).collect();
        // 100 messages a second for 1.6 s, each at the start of its 10 ms,
        // except message 20, 3 ms late (within the early margin), and
        // message 30, 5 ms late.
        let start = sim.now_ms;
        assert!(start < 100, "the rounds of the shard's clock are where this test expects them");
        let sent_at =
            |m: u64| start + 10 * m + [(20, 3), (30, 5)].iter().find(|&&(l, _)| l == m).map_or(0, |&(_, by)| by);
        let mut got = vec![Vec::new(); subs.len()];
        // How many subscribers each arrival wrote, by the arrival's ms.
        let mut written_on_arrival = Vec::new();
        let mut next = 0;
        while sim.now_ms < start + 1630 {
            if next < 160 && sim.now_ms == sent_at(next) {
                let writes: Vec<usize> = subs.iter().map(|c| sim.writes[&c.peer]).collect();
                sim.send_text(publisher, &format!("web_pipe2\nweb_hot\ne\n*\n{next}"));
                sim.settle();
                let n = subs.iter().zip(writes).filter(|(c, w)| sim.writes[&c.peer] > *w).count();
                written_on_arrival.push((sim.now_ms, n));
                next += 1;
            }
            received(&mut sim, &subs, &mut got);
            sim.advance(1);
        }
        received(&mut sim, &subs, &mut got);
        for ((c, got), before) in subs.iter().zip(&got).zip(before) {
            let order: Vec<u64> = got.iter().map(|&(m, _)| m).collect();
            assert_eq!(order, (0..160).collect::<Vec<u64>>(), "every message, in order");
            for &(m, at) in got {
                let waited = at - sent_at(m);
                assert!(
                    waited <= 24,
                    "message {m} waited {waited} ms: at most the window, the margin and the rest of its ms"
                );
            }
            // Three messages a write while the stream runs (160 messages:
            // 54 writes), and a few more where windows started afresh.
            let writes = sim.writes[&c.peer] - before;
            assert!(writes <= 60, "{writes} writes for 160 messages");
        }
        // The groups keep their phases: each arrival writes some of the
        // subscribers, never all of them (at 100 a second and 20 ms, first
        // windows shorter than 10 ms, half of them, put their groups in
        // one phase). The late message puts groups in step, so that some
        // arrivals write nobody; the next round staggers them afresh.
        let share = |from: u64, to: u64| -> Vec<usize> {
            written_on_arrival
                .iter()
                .filter(|&&(at, _)| at >= start + from && at < start + to)
                .map(|&(_, n)| n)
                .collect()
        };
        // (Groups start afresh every 250 ms: the late message's effect
        // lasts until 500.)
        let steady = share(100, 300);
        let (in_step, afresh) = (share(310, 500), share(550, 1600));
        let spread = |n: &usize| *n > 0 && *n <= subs.len() * 9 / 16;
        assert!(steady.iter().all(spread), "{steady:?}");
        assert!(in_step.contains(&0), "the late message put groups in step: {in_step:?}");
        assert!(afresh.iter().all(spread), "{afresh:?}");
        assert!(sim.cores[0].delayed.is_empty());
    }

    #[test]
    fn requests_waiting_for_other_shards_are_bounded_per_connection() {
        let mut sim = Sim::new(2, Config { max_pending: 2, ..config() });
        let c = sim.websocket(0, &anon("asker"));
        sim.messages(c);
        for _ in 0..3 {
            sim.send_text(c, "pipe_count\nweb_q\nm\n");
        }
        let early = sim.messages(c);
        assert_eq!(early.len(), 1, "{early:?}");
        assert!(early[0].to_string().contains("too many requests waiting"), "{early:?}");
        sim.settle();
        assert_eq!(sim.messages(c).len(), 2, "the two admitted are answered");
        sim.send_text(c, "pipe_count\nweb_q\nm\n");
        sim.settle();
        assert_eq!(sim.messages(c)[0]["data"]["user_in_pipe"], 0);
    }

    #[test]
    fn mail_past_the_limit_stops_reading_until_the_receiver_drains() {
        let mut sim = Sim::new(
            2,
            Config { mail_limit: 1 << 20, max_message_size: 1 << 20, outbound_limit: 16 << 20, ..config() },
        );
        let publisher = sim.websocket(0, &anon("pub"));
        sim.messages(publisher);
        let big = "z".repeat(200 * 1024);
        let mut sent = 0;
        while sim.send_text(publisher, &format!("web_pipe2\nweb_big\ne\n*\n{big}")) == Flow::Continue {
            sent += 1;
            assert!(sent < 20, "never congested");
        }
        let id = sim.home(publisher).expect("open").1;
        assert!(!sim.cores[0].may_read(id), "reading stopped");
        assert_eq!(sim.send_text(publisher, "web_pipe2\nweb_big\ne\n*\nx"), Flow::Paused);
        sim.settle();
        assert!(sim.cores[0].may_read(id), "reading resumed once the other shard drained");
        let reports = sim.messages(publisher);
        assert_eq!(reports.len(), sent + 1, "every publish was reported: {}", reports.len());
    }

    #[test]
    fn a_burst_of_publishes_to_a_big_channel_yields_its_turn_and_loses_nothing() {
        let mut sim = Sim::new(1, Config { shards: 1, client_rate: 1000, max_connections_per_ip: 100_000, ..config() });
        let subs: Vec<Client> = (0..1500).map(|i| subscriber(&mut sim, 0, &format!("s{i}"), "web_big")).collect();
        let publisher = sim.websocket(0, &anon("pub"));
        sim.messages(publisher);
        let burst: Vec<u8> =
            (0..10).flat_map(|i| masked(0x81, format!("web_pipe2\nweb_big\ne\n*\n{i}").as_bytes())).collect();
        let id = sim.home(publisher).expect("open").1;
        let core = &mut sim.cores[0];
        core.work = 0;
        let mut data = burst.clone();
        // 1,500 deliveries a publish: the turn ends after the third.
        assert_eq!(core.readable(id, &mut data), Flow::Yield);
        let mut turns = 1;
        loop {
            sim.run_local();
            let core = &mut sim.cores[0];
            core.work = 0;
            match core.resume(id) {
                Flow::Yield => turns += 1,
                Flow::Continue => break,
                other => panic!("{other:?}"),
            }
        }
        sim.run_local();
        assert_eq!(turns + 1, 4, "10 publishes in turns of 3");
        for c in subs.iter().step_by(100) {
            let got: Vec<String> =
                sim.messages(*c).iter().map(|m| m["data"].as_str().unwrap_or_default().to_string()).collect();
            assert_eq!(got, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
        }
    }
}
