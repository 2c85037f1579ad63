//! The soak's load generator and its audit check, shared by the `soak` binary (which runs the
//! proxy and the mock upstream as processes, see `examples/proxy/soak/`) and a short test.
//!
//! [`load`] keeps `connections` HTTP/1.1 keep-alive connections busy until the deadline, each
//! sending, in turn: allowed chat completions, chat completions for a model outside the key's
//! list (403), image generations the key may not use (422) and streamed chat completions
//! (read to `data: [DONE]`). Any other outcome (a wrong status, a failed connection, a body
//! that does not end as it should, no `x-request-id`) is an unexpected error. Every answer's
//! `x-request-id` (the audit record's id) is kept, so that [`check_audit`] can tell whether
//! every request left exactly one record.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What [`load`] sends.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The proxy.
    pub proxy: SocketAddr,
    /// A key allowed `gpt-4o-mini` and not `gpt-4.1`, without image generation.
    pub key: String,
    /// Connections kept busy at once.
    pub connections: usize,
    /// How long to send for (requests in flight at the deadline are finished).
    pub duration: Duration,
}

/// The kinds of request [`load`] sends, in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `gpt-4o-mini`: 200.
    Allowed,
    /// `gpt-4.1`, outside the key's list: 403.
    BlockedModel,
    /// Image generation, blocked for the key: 422.
    BlockedFeature,
    /// Streamed `gpt-4o-mini`: 200, read to `data: [DONE]`.
    Streamed,
}

const KINDS: [Kind; 8] = [
    Kind::Allowed,
    Kind::Streamed,
    Kind::BlockedModel,
    Kind::Allowed,
    Kind::Streamed,
    Kind::BlockedFeature,
    Kind::Allowed,
    Kind::Streamed,
];

/// What [`load`] saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Requests sent (answered or not).
    pub requests: u64,
    /// Requests per kind, as answered as expected.
    pub ok: HashMap<String, u64>,
    /// Unexpected outcomes.
    pub unexpected: u64,
    /// The first few unexpected outcomes, described.
    pub samples: Vec<String>,
    /// The `x-request-id` of every answer.
    pub ids: Vec<String>,
    /// How long the load ran.
    pub elapsed: Duration,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ok: Vec<_> = self.ok.iter().collect();
        ok.sort();
        writeln!(
            f,
            "requests: {} in {:.1}s ({:.0}/s)",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.requests as f64 / self.elapsed.as_secs_f64().max(0.001)
        )?;
        for (kind, n) in ok {
            writeln!(f, "  {kind}: {n} as expected")?;
        }
        writeln!(f, "unexpected errors: {}", self.unexpected)?;
        for sample in &self.samples {
            writeln!(f, "  {sample}")?;
        }
        Ok(())
    }
}

/// Runs the load; see the [module docs](self).
pub async fn load(options: LoadOptions) -> LoadReport {
    let started = Instant::now();
    let deadline = started + options.duration;
    let options = Arc::new(options);
    let mut tasks = Vec::with_capacity(options.connections);
    for n in 0..options.connections {
        let options = options.clone();
        tasks.push(tokio::spawn(connection(options, n, deadline)));
    }
    let mut report = LoadReport::default();
    for task in tasks {
        match task.await {
            Ok(part) => {
                report.requests += part.requests;
                for (kind, n) in part.ok {
                    *report.ok.entry(kind).or_default() += n;
                }
                report.unexpected += part.unexpected;
                for sample in part.samples {
                    if report.samples.len() < 10 {
                        report.samples.push(sample);
                    }
                }
                report.ids.extend(part.ids);
            }
            Err(err) => {
                report.unexpected += 1;
                report.samples.push(format!("load task failed: {err}"));
            }
        }
    }
    report.elapsed = started.elapsed();
    report
}

/// One connection's loop: reconnects after a failure.
async fn connection(options: Arc<LoadOptions>, n: usize, deadline: Instant) -> LoadReport {
    let mut report = LoadReport::default();
    let mut turn = n;
    let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
    while Instant::now() < deadline {
        let kind = KINDS[turn % KINDS.len()];
        turn += 1;
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            match connect(options.proxy).await {
                Ok(s) => sender = Some(s),
                Err(err) => {
                    report.requests += 1;
                    unexpected(&mut report, format!("connect: {err}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        report.requests += 1;
        match one(s, &options, kind).await {
            Ok(id) => {
                *report.ok.entry(format!("{kind:?}")).or_default() += 1;
                report.ids.push(id);
            }
            Err(why) => {
                unexpected(&mut report, format!("{kind:?}: {why}"));
                sender = None;
            }
        }
    }
    report
}

fn unexpected(report: &mut LoadReport, why: String) {
    report.unexpected += 1;
    if report.samples.len() < 10 {
        report.samples.push(why);
    }
}

async fn connect(addr: SocketAddr) -> Result<http1::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request of `kind`; its record id if the answer is as expected.
async fn one(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    options: &LoadOptions,
    kind: Kind,
) -> Result<String, String> {
    let (path, body, expected) = match kind {
        Kind::Allowed => (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"soak test hello"}]}"#,
            StatusCode::OK,
        ),
        Kind::Streamed => (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"soak test stream"}]}"#,
            StatusCode::OK,
        ),
        Kind::BlockedModel => (
            "/v1/chat/completions",
            r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"soak test blocked"}]}"#,
            StatusCode::FORBIDDEN,
        ),
        Kind::BlockedFeature => (
            "/v1/images/generations",
            r#"{"model":"dall-e-3","prompt":"a soak test"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    };
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", options.proxy.to_string())
        .header("authorization", format!("Bearer {}", options.key))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| format!("ready: {e}"))?;
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .map_err(|_| "no answer in 30s".to_owned())?
        .map_err(|e| format!("send: {e}"))?;
    let status = response.status();
    let id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = tokio::time::timeout(Duration::from_secs(30), response.into_body().collect())
        .await
        .map_err(|_| "body not finished in 30s".to_owned())?
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if status != expected {
        return Err(format!(
            "status {status}, expected {expected}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ));
    }
    let complete = match kind {
        Kind::Streamed => bytes.ends_with(b"data: [DONE]\n\n"),
        Kind::Allowed => bytes.starts_with(b"{") && bytes.ends_with(b"}"),
        Kind::BlockedModel => contains(&bytes, "model_not_allowed"),
        Kind::BlockedFeature => contains(&bytes, "feature_blocked"),
    };
    if !complete {
        return Err(format!(
            "unexpected body: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ));
    }
    id.ok_or_else(|| "no x-request-id".to_owned())
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// How the audit log matches the requests sent.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AuditCheck {
    /// Records in the log.
    pub records: u64,
    /// Lines that are not JSON records with a `request_id`.
    pub unreadable: u64,
    /// Answered requests without a record.
    pub missing: u64,
    /// Answered requests with more than one record.
    pub duplicated: u64,
    /// Records of no answered request.
    pub unknown: u64,
}

impl AuditCheck {
    /// Whether every answered request has exactly one record, and there is no other record.
    pub fn exactly_once(&self) -> bool {
        self.unreadable == 0 && self.missing == 0 && self.duplicated == 0 && self.unknown == 0
    }
}

impl fmt::Display for AuditCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit records: {} (missing {}, duplicated {}, unknown {}, unreadable {}): {}",
            self.records,
            self.missing,
            self.duplicated,
            self.unknown,
            self.unreadable,
            if self.exactly_once() {
                "every request audited exactly once"
            } else {
                "NOT exactly once"
            }
        )
    }
}

/// Compares the ids of the answered requests with the records of a JSON Lines audit log.
pub fn check_audit(ids: &[String], jsonl: &str) -> AuditCheck {
    check_audit_lines(ids, jsonl.lines().map(|line| Ok(line.to_owned())))
        .expect("lines of a string cannot fail")
}

/// [`check_audit`] over the lines of a reader (a large log is never held whole).
pub fn check_audit_lines(
    ids: &[String],
    lines: impl Iterator<Item = std::io::Result<String>>,
) -> std::io::Result<AuditCheck> {
    let mut check = AuditCheck::default();
    let mut seen: HashMap<&str, u32> = HashMap::with_capacity(ids.len());
    for id in ids {
        seen.insert(id, 0);
    }
    let mut unknown_ids: Vec<String> = Vec::new();
    for line in lines {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        check.records += 1;
        let id = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("request_id")?.as_str().map(str::to_owned));
        match id {
            None => check.unreadable += 1,
            Some(id) => match seen.get_mut(id.as_str()) {
                Some(count) => *count += 1,
                None => unknown_ids.push(id),
            },
        }
    }
    check.unknown = unknown_ids.len() as u64;
    for count in seen.values() {
        match count {
            0 => check.missing += 1,
            1 => {}
            _ => check.duplicated += 1,
        }
    }
    // Two answers with one id would hide a missing record.
    check.duplicated += (ids.len() - seen.len()) as u64;
    Ok(check)
}

/// The resident set size of process `pid` (`VmRSS` of `/proc/<pid>/status`), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// The peak resident set size of process `pid` (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_check_counts_missing_duplicated_and_unknown_records() {
        let ids: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let log = "{\"request_id\":\"a\"}\n{\"request_id\":\"b\"}\n{\"request_id\":\"b\"}\n\
                   {\"request_id\":\"z\"}\nnot json\n";
        let check = check_audit(&ids, log);
        assert_eq!(
            check,
            AuditCheck {
                records: 5,
                unreadable: 1,
                missing: 1,
                duplicated: 1,
                unknown: 1,
            }
        );
        assert!(!check.exactly_once());
        let good = check_audit(
            &ids,
            "{\"request_id\":\"a\"}\n{\"request_id\":\"c\"}\n{\"request_id\":\"b\"}\n",
        );
        assert!(good.exactly_once(), "{good}");
    }

    #[test]
    fn this_process_has_a_resident_set() {
        let rss = rss_kib(std::process::id()).expect("VmRSS on Linux");
        assert!(rss > 0);
        assert!(peak_rss_kib(std::process::id()).expect("VmHWM") >= rss);
    }
}
