//! The shard glue for the HTTP API port: reads requests off a connection
//! (sans-IO framing in [`crate::api::http1`]), checks each request's key
//! against the dev_id it names, and hands the statement the request means
//! to the same executor and answer queue as CometQL (`super::sql`), so
//! pipelined requests are answered in order.
//!
//! A bad key counts as a failed backend login: the same per-address
//! throttle ([`super::limits::AuthFailures`]) and the same metric as a
//! CometQL login. A throttled address is answered 429 (code 1129) for
//! every request until its block ends, whatever key it sends.

use std::net::SocketAddr;

use super::ConnId;
use super::conn::Phase;
use super::core::ShardCore;
use super::sql::{Slot, SqlConn};
use crate::api::{self, ApiError, http1};
use crate::cometql::session::Passwords;
use crate::domain::ct_eq;
use crate::metrics::ShardMetrics;
use crate::shard::limits::{AUTH_FAILURES_ALLOWED, AUTH_WINDOW_SECS};

/// Seconds an HTTP API connection may sit idle (no request started, no
/// answer owed) before it is closed.
pub const IDLE_TIMEOUT: u32 = 60;

impl ShardCore {
    /// Registers a connection accepted on the HTTP API port.
    pub fn accept_api(&mut self, peer: SocketAddr) -> ConnId {
        ShardMetrics::add(&self.metrics.accepted, 1);
        let id = self.open(peer);
        // A blocked address is answered at once, as at a CometQL accept:
        // it takes no slot, nor anyone else's.
        if let Some(secs) = self.shared.auth_failures.refused(peer.ip(), self.unix as u64) {
            ShardMetrics::add(&self.metrics.auth_refusals, 1);
            let message = format!(
                "Host '{}' is blocked for {secs} s after more than {AUTH_FAILURES_ALLOWED} failed logins in {AUTH_WINDOW_SECS} s",
                peer.ip()
            );
            let e = ApiError { retry_after: Some(secs), ..ApiError::new(429, 1129, message) };
            self.send_raw_bytes(id, api::error_answer(&e, true));
            // Lingering: the request it sent is read, so that the close is
            // not a reset that would destroy the answer.
            self.finish_after_flush(id, false);
            return id;
        }
        if !self.admit_backend() {
            let max = self.shared.config.max_backend_connections;
            let e = ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    503,
                    1040,
                    format!("Too many connections: comet holds {max} backend connections (--max-backend-connections)"),
                )
            };
            self.send_raw_bytes(id, api::error_answer(&e, true));
            self.close_after_answer(id);
            return id;
        }
        if let Some(c) = self.conns.get_mut(id) {
            c.phase = Phase::Sql;
            c.sql = Some(Box::new(SqlConn::http()));
            self.backends.push(id);
        }
        self.metrics.sql_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        id
    }

    /// Handles bytes from an HTTP API connection; returns bytes consumed
    /// (the rest is an unfinished request, kept for the next read).
    pub(super) fn on_api(&mut self, id: ConnId, buf: &mut [u8]) -> usize {
        let max_body = self.shared.config.max_query_size;
        if self.sql(id).and_then(SqlConn::http_mut).is_none_or(|h| h.closing) {
            return buf.len();
        }
        let mut pos = 0;
        while pos < buf.len() {
            // --max-pending reached, or the shard's mail is congested: the
            // rest waits in the buffer until answers come back.
            if !self.may_read(id) {
                break;
            }
            let head = match http1::parse_head(&buf[pos..], max_body) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    // Where the next request would start is unknown: answer
                    // and close (lingering, so the answer is read).
                    if let Some(http) = self.sql(id).and_then(SqlConn::http_mut) {
                        http.closing = true;
                    }
                    self.sql_push_raw(id, api::error_answer(&e, true), true);
                    return buf.len();
                }
            };
            let end = pos + head.head_len + head.body_len;
            if end > buf.len() {
                // The key first: a client without one holds no body here,
                // and gets no `100 Continue`.
                if self.sql(id).and_then(SqlConn::http_mut).is_some_and(|h| !h.key_checked) {
                    let checked =
                        api::target(&head.target).and_then(|t| self.api_key(id, t.dev_id, head.key.as_deref()));
                    if let Err(e) = checked {
                        if let Some(http) = self.sql(id).and_then(SqlConn::http_mut) {
                            http.closing = true;
                        }
                        self.sql_push_raw(id, api::error_answer(&e, true), true);
                        return buf.len();
                    }
                    if let Some(http) = self.sql(id).and_then(SqlConn::http_mut) {
                        http.key_checked = true;
                    }
                }
                if head.expect_continue
                    && let Some(http) = self.sql(id).and_then(SqlConn::http_mut)
                    && !http.continued
                {
                    http.continued = true;
                    self.sql_push_raw(id, http1::CONTINUE.to_vec(), false);
                }
                break;
            }
            if let Some(http) = self.sql(id).and_then(SqlConn::http_mut) {
                http.continued = false;
                http.key_checked = false;
            }
            let body = &buf[pos + head.head_len..end];
            pos = end;
            let close = !head.keep_alive;
            if close && let Some(http) = self.sql(id).and_then(SqlConn::http_mut) {
                http.closing = true;
            }
            match self.api_request(id, &head, body) {
                Ok((dev_id, st)) => self.sql_query(id, vec![Ok(st)], Slot::http(dev_id, close)),
                Err(e) => self.sql_push_raw(id, api::error_answer(&e, close), close),
            }
            if close || self.conns.get(id).is_none_or(|c| c.phase != Phase::Sql) {
                return buf.len();
            }
        }
        pos
    }

    /// The statement one request means, once its key opened its dev_id.
    fn api_request(
        &mut self,
        id: ConnId,
        head: &http1::Head,
        body: &[u8],
    ) -> Result<(u32, crate::cometql::parser::Statement), ApiError> {
        let target = api::target(&head.target)?;
        self.api_key(id, target.dev_id, head.key.as_deref())?;
        Ok((target.dev_id, api::route(&head.method, &target, body)?))
    }

    /// Checks a request's key against the password of `dev_id` (in
    /// constant time), after the failed-login throttle of its address.
    fn api_key(&mut self, id: ConnId, dev_id: u32, key: Option<&str>) -> Result<(), ApiError> {
        let Some(peer) = self.conns.get(id).map(|c| c.peer) else {
            return Err(ApiError::new(500, 500, "connection gone"));
        };
        let cached = self.sql(id).and_then(SqlConn::http_mut).and_then(|h| h.good_key.as_ref());
        if let (Some((d, k)), Some(key)) = (cached, key)
            && *d == dev_id
            && ct_eq(k.as_bytes(), key.as_bytes())
        {
            return Ok(());
        }
        if let Some(secs) = self.shared.auth_failures.refused(peer.ip(), self.unix as u64) {
            ShardMetrics::add(&self.metrics.auth_refusals, 1);
            let message = format!(
                "Host '{}' is blocked for {secs} s after more than {AUTH_FAILURES_ALLOWED} failed logins in {AUTH_WINDOW_SECS} s",
                peer.ip()
            );
            return Err(ApiError { retry_after: Some(secs), ..ApiError::new(429, 1129, message) });
        }
        let password = self.shared.config.password(dev_id);
        if let Some(k) = key.filter(|k| ct_eq(k.as_bytes(), password.as_bytes())) {
            if let Some(http) = self.sql(id).and_then(SqlConn::http_mut) {
                http.good_key = Some((dev_id, Box::from(k)));
            }
            return Ok(());
        }
        self.login_failed(id);
        let why = if key.is_some() { "wrong key" } else { "no key" };
        Err(ApiError::new(
            401,
            16,
            format!(
                "Access denied for dev_id {dev_id} ({why}): send its password as 'Authorization: Bearer <password>' or 'X-API-Key: <password>'"
            ),
        ))
    }
}

impl SqlConn {
    fn http_mut(&mut self) -> Option<&mut super::sql::HttpConn> {
        match &mut self.transport {
            super::sql::Transport::Http(h) => Some(h),
            super::sql::Transport::MySql(_) => None,
        }
    }
}
