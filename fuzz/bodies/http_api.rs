//! Fuzz body for the HTTP API (`comet::api`): request framing, the request
//! → statement mapping and the JSON answers.
//!
//! The input is what a backend sends on the API port. A parsed head must be
//! self-consistent (within the input and the bounds, the same head when
//! re-read from exactly its own bytes); a complete request goes through
//! target parsing, routing and the planner as in the shard glue, and every
//! answer (result or error) must be one well-formed HTTP response whose
//! body is valid JSON of the documented shape.

use comet::api::{self, http1};
use comet::cometql::exec::{self, Ctx, Plan};

/// The body limit the input is framed with (small, so 413 is reachable).
const MAX_BODY: usize = 4096;

pub fn run(data: &[u8]) {
    let head = match http1::parse_head(data, MAX_BODY) {
        Ok(Some(h)) => h,
        Ok(None) => {
            assert!(data.len() <= http1::MAX_HEAD, "an incomplete head over the bound must be refused");
            return;
        }
        Err(e) => {
            check_answer(&api::error_answer(&e, true), e.status);
            return;
        }
    };
    assert!(head.head_len <= data.len() && head.head_len <= http1::MAX_HEAD);
    assert!(head.body_len <= MAX_BODY, "a body over the limit is refused from its head");
    assert_eq!(http1::parse_head(&data[..head.head_len], MAX_BODY), Ok(Some(head.clone())));
    let Some(body) = data.get(head.head_len..head.head_len + head.body_len) else { return };
    let statement = api::target(&head.target).and_then(|t| api::route(&head.method, &t, body));
    match statement {
        Err(e) => {
            assert!(matches!(e.status, 400 | 404 | 405 | 422), "{e:?}");
            check_answer(&api::error_answer(&e, !head.keep_alive), e.status);
        }
        Ok(st) => {
            if let Plan::Done(r) = exec::plan(st, &Ctx::standalone(MAX_BODY)) {
                let answer = api::answer(&r, !head.keep_alive);
                check_answer(&answer, 0);
            }
        }
    }
}

/// One complete HTTP response (with `status` unless 0), framed by its
/// Content-Length, with a JSON object body.
fn check_answer(answer: &[u8], status: u16) {
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut resp = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(n)) = resp.parse(answer) else { panic!("not one HTTP head") };
    if status != 0 {
        assert_eq!(resp.code, Some(status));
    }
    let len: usize = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
        .expect("Content-Length");
    assert_eq!(answer.len(), n + len, "the body is exactly Content-Length bytes");
    let json: serde_json::Value = serde_json::from_slice(&answer[n..]).expect("the body is JSON");
    assert!(json.get("affected").is_some() || json.get("rows").is_some() || json["error"]["code"].is_u64(), "{json}");
}
