//! The client's address behind trusted reverse proxies: [`TrustedProxies`] reads
//! `X-Forwarded-For` or `Forwarded` (RFC 7239) only when the connection comes from a trusted
//! proxy, and [`ResolveClientIpLayer`] puts the result into the request's extensions as
//! [`ClientIp`], for [`KeyAuth`](crate::KeyAuth)'s `allow_ips` and the audit record.
//!
//! # The rule
//!
//! 1. The *peer* is the connection's address. An IPv4 address seen through an IPv6 socket
//!    (`::ffff:10.0.0.1`) counts as IPv4 everywhere (it matches `10.0.0.0/8`), and is
//!    returned as IPv4.
//! 2. A peer outside every trusted range is the client. Its headers change nothing: anyone
//!    can send them. With no trusted range at all ([`TrustedProxies::none`], the default),
//!    the headers are never read.
//! 3. From a trusted peer, **exactly one** of the two headers is read: `Forwarded` if only it
//!    is present, `X-Forwarded-For` if only it is. A request carrying **both** is treated as
//!    carrying neither (the client is the peer). A proxy writes one of them and passes the
//!    other on as the client sent it: whichever we preferred, a client could pick its own
//!    address by sending the header its proxy does not write. Better: name the header your
//!    proxy writes ([`TrustedProxies::header`]); the other is then ignored, and a client
//!    sending both hides nothing.
//! 4. The header's lines are joined in order and its hops walked **from the right** (the hop
//!    nearest to us first). The first address that is not a trusted proxy is the client. If
//!    every hop is a trusted proxy, the client is the left-most one.
//! 5. A hop that cannot be read stops the walk, and the client is then the **last trusted
//!    address seen** (the peer, or the right-most trusted hop before it): the proxy that
//!    wrote the unreadable hop is the last one we can vouch for. Unreadable means: not an IP
//!    address (with an optional port, IPv6 in brackets), an obfuscated identifier
//!    (`_hidden`) or `unknown`, an empty hop, a `Forwarded` element without exactly one
//!    `for=`, or an element holding a byte that is not visible ASCII: only the elements right
//!    of a line's last such byte are read. Likewise, in a `Forwarded` line with an odd
//!    number of `"` or with a `\`, quoted strings cannot be told apart: only the elements
//!    right of its last `"` or `\` are read (where a proxy appending to the line it received
//!    puts its own), and the element holding that character is unreadable. Nothing left of
//!    a hop that could not be read is ever used, so a malformed header never makes an
//!    address chosen by the client the client's.
//! 6. At most [`max_hops`](TrustedProxies::max_hops) hops are walked (default
//!    [`DEFAULT_MAX_HOPS`]); a longer chain of trusted proxies ends like rule 5. The walk
//!    allocates nothing and reads each byte of the header a bounded number of times, so a
//!    header of 10 000 hops costs no more than its length.
//!
//! Rules 3 and 5 fall back on a trusted proxy's own address. Such an address is not one a
//! client chose, but it is not the client's either: **do not put your proxies' ranges in a
//! key's `allow_ips`**, or a client behind them could be let in by sending a malformed
//! header.
//!
//! ```
//! use std::net::{IpAddr, SocketAddr};
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_policy::{ClientIp, ResolveClientIpLayer, TrustedProxies};
//!
//! # tokio_test();
//! # fn tokio_test() { tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let trusted = TrustedProxies::new(["10.0.0.0/8".parse().unwrap()]);
//! let svc = ServiceBuilder::new()
//!     .layer(ResolveClientIpLayer::new(trusted))
//!     .service(service_fn(|req: Request<String>| async move {
//!         let client = req.extensions().get::<ClientIp>().unwrap().0;
//!         let status = if client == "203.0.113.5".parse::<IpAddr>().unwrap() {
//!             StatusCode::OK
//!         } else {
//!             StatusCode::FORBIDDEN
//!         };
//!         let mut res = Response::new(String::new());
//!         *res.status_mut() = status;
//!         Ok::<_, std::convert::Infallible>(res)
//!     }));
//!
//! // From a trusted proxy, the right-most untrusted hop is the client.
//! let mut req = Request::new(String::new());
//! req.headers_mut().insert("x-forwarded-for", "198.51.100.1, 203.0.113.5, 10.0.0.2".parse().unwrap());
//! req.extensions_mut().insert("10.0.0.1:40000".parse::<SocketAddr>().unwrap());
//! assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), StatusCode::OK);
//!
//! // From anyone else, the header changes nothing.
//! let mut req = Request::new(String::new());
//! req.headers_mut().insert("x-forwarded-for", "203.0.113.5".parse().unwrap());
//! req.extensions_mut().insert("198.51.100.9:40000".parse::<SocketAddr>().unwrap());
//! assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::FORBIDDEN);
//! # }) }
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::FORWARDED;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use ipnet::IpNet;
use tower_layer::Layer;
use tower_service::Service;

use crate::key_auth::ClientIp;

/// `X-Forwarded-For` (not among `http`'s constants).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Hops of a forwarding header walked at most, by default (see
/// [`TrustedProxies::max_hops`]).
pub const DEFAULT_MAX_HOPS: usize = 20;

/// The address ranges of the reverse proxies whose forwarding headers are believed. See the
/// [module docs](self) for the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Arc<[IpNet]>,
    max_hops: usize,
    header: ForwardedHeader,
}

/// Which forwarding header the trusted proxies write ([`TrustedProxies::header`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// Whichever one the request carries; a request carrying both is read as carrying neither
    /// (rule 3 of the [module docs](self)). The default.
    #[default]
    Either,
    /// `X-Forwarded-For` only; a `Forwarded` header is ignored.
    XForwardedFor,
    /// `Forwarded` (RFC 7239) only; an `X-Forwarded-For` header is ignored.
    Forwarded,
}

impl Default for TrustedProxies {
    fn default() -> Self {
        TrustedProxies::none()
    }
}

impl TrustedProxies {
    /// Trusts the proxies in `nets` (CIDR blocks; a single address is a `/32` or `/128`).
    pub fn new<I: IntoIterator<Item = IpNet>>(nets: I) -> Self {
        TrustedProxies {
            nets: nets.into_iter().collect(),
            max_hops: DEFAULT_MAX_HOPS,
            header: ForwardedHeader::Either,
        }
    }

    /// Reads only the header the trusted proxies write (default: either, see rule 3 of the
    /// [module docs](self)). Naming it means a client that sends the other as well cannot
    /// make itself look like its proxy.
    #[must_use]
    pub fn header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// Trusts no proxy: the client is always the connection's peer, headers are never read.
    pub fn none() -> Self {
        TrustedProxies::new([])
    }

    /// Walks at most `hops` hops of a forwarding header (at least one is always walked). A
    /// chain of trusted proxies longer than that ends at the last one walked.
    #[must_use]
    pub fn max_hops(mut self, hops: usize) -> Self {
        self.max_hops = hops.max(1);
        self
    }

    /// The trusted ranges.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is in a trusted range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client's address, for a connection from `peer` with these `headers`. See the
    /// [module docs](self). IPv4-mapped IPv6 addresses come back as IPv4.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return peer;
        }
        let forwarded = headers.get_all(FORWARDED);
        let x_forwarded_for = headers.get_all(X_FORWARDED_FOR);
        let has_forwarded = forwarded.iter().next().is_some();
        let has_xff = x_forwarded_for.iter().next().is_some();
        match (self.header, has_forwarded, has_xff) {
            (ForwardedHeader::Forwarded, true, _) | (ForwardedHeader::Either, true, false) => {
                self.walk(peer, forwarded.iter(), Syntax::Forwarded)
            }
            (ForwardedHeader::XForwardedFor, _, true) | (ForwardedHeader::Either, false, true) => {
                self.walk(peer, x_forwarded_for.iter(), Syntax::XForwardedFor)
            }
            // Neither (of the named one), or both with none named: see rule 3.
            _ => peer,
        }
    }

    /// Rules 4 to 6: the lines' hops from the right.
    fn walk<'a, I>(&self, peer: IpAddr, lines: I, syntax: Syntax) -> IpAddr
    where
        I: DoubleEndedIterator<Item = &'a HeaderValue>,
    {
        let mut last_trusted = peer;
        let mut hops = 0;
        for line in lines.rev() {
            let Some((line, whole)) = readable_part(line, syntax) else {
                return last_trusted;
            };
            let mut rest = line;
            loop {
                if hops == self.max_hops {
                    return last_trusted;
                }
                hops += 1;
                let (element, more) = split_last_element(rest, syntax);
                let Some(ip) = parse_hop(element, syntax) else {
                    return last_trusted;
                };
                let ip = canonical(ip);
                if !self.nets.iter().any(|net| net.contains(&ip)) {
                    return ip;
                }
                last_trusted = ip;
                match more {
                    Some(more) => rest = more,
                    None => break,
                }
            }
            if !whole {
                // The next hop to the left is the one that could not be read.
                return last_trusted;
            }
        }
        last_trusted
    }
}

/// Which header is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Syntax {
    Forwarded,
    XForwardedFor,
}

/// An IPv4-mapped IPv6 address as IPv4; anything else as it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The part of a line that can be split into hops (rule 5), and whether it is the whole line.
///
/// A `Forwarded` line with an odd number of `"` or with a `\` cannot be split into elements
/// with certainty. Only the elements right of its last `"` or `\` (and of the comma after it)
/// can: no quoted string can hide there, as none could be closed. That is where a proxy that
/// appends its element to the line it received puts it, after whatever its client sent.
fn readable_part(line: &HeaderValue, syntax: Syntax) -> Option<(&str, bool)> {
    // A byte that is not visible ASCII (a client's, say) makes its element unreadable, not
    // the elements right of it: a proxy appends its own after a comma.
    let bytes = line.as_bytes();
    let (bytes, visible) = match bytes
        .iter()
        .rposition(|&b| !(b == b'\t' || (0x20..=0x7e).contains(&b)))
    {
        None => (bytes, true),
        Some(bad) => {
            let after = &bytes[bad + 1..];
            let comma = memchr::memchr(b',', after)?;
            (&after[comma + 1..], false)
        }
    };
    let text = std::str::from_utf8(bytes).ok()?;
    if syntax == Syntax::XForwardedFor {
        return Some((text, visible));
    }
    let bytes = text.as_bytes();
    let balanced =
        memchr::memchr(b'\\', bytes).is_none() && memchr::memchr_iter(b'"', bytes).count() % 2 == 0;
    if balanced {
        return Some((text, visible));
    }
    let last_bad = memchr::memrchr2(b'"', b'\\', bytes)?;
    let after = &text[last_bad + 1..];
    let comma = after.find(',')?;
    Some((&after[comma + 1..], false))
}

/// The last comma-separated element of `line`, and what is left of it, if there was a comma.
///
/// In `Forwarded`, commas inside quoted strings do not split: [`readable_part`] made sure
/// quotes pair up, so counting them from the right finds the same elements as from the left.
/// `X-Forwarded-For` has no quoted strings (a quote makes its hop unreadable), so a quote a
/// client sent can never join its text to the hops on its right.
fn split_last_element(line: &str, syntax: Syntax) -> (&str, Option<&str>) {
    let mut quoted = false;
    for (i, b) in line.bytes().enumerate().rev() {
        match b {
            b'"' if syntax == Syntax::Forwarded => quoted = !quoted,
            b',' if !quoted => return (&line[i + 1..], Some(&line[..i])),
            _ => {}
        }
    }
    (line, None)
}

/// The address of one hop, if it is an address.
fn parse_hop(element: &str, syntax: Syntax) -> Option<IpAddr> {
    let element = element.trim_matches([' ', '\t']);
    match syntax {
        Syntax::XForwardedFor => parse_node(element),
        Syntax::Forwarded => {
            // `for=...;proto=...;by=...`: exactly one `for`.
            let mut found = None;
            for pair in element.split(';') {
                let (name, value) = pair.split_once('=')?;
                let name = name.trim_matches([' ', '\t']);
                let value = value.trim_matches([' ', '\t']);
                if name.is_empty() || value.is_empty() {
                    return None;
                }
                let value = match value.strip_prefix('"') {
                    Some(quoted) => {
                        let inner = quoted.strip_suffix('"')?;
                        if inner.contains('"') {
                            return None;
                        }
                        inner
                    }
                    None if value.contains('"') => return None,
                    None => value,
                };
                if name.eq_ignore_ascii_case("for") {
                    if found.is_some() {
                        return None;
                    }
                    found = Some(value);
                }
            }
            parse_node(found?)
        }
    }
}

/// An address with an optional port: `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]`,
/// `[2001:db8::1]:4711` or a bare `2001:db8::1`. `unknown`, `_obfuscated` and anything else
/// is `None`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Some(bracketed) = node.strip_prefix('[') {
        let (v6, after) = bracketed.split_once(']')?;
        if !after.is_empty() && !is_port(after.strip_prefix(':')?) {
            return None;
        }
        return v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    let (v4, port) = node.split_once(':')?;
    if !is_port(port) {
        return None;
    }
    v4.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A port (RFC 7239 `node-port`): a number up to 65535, or an obfuscated one (`_abc`).
fn is_port(port: &str) -> bool {
    let digits =
        port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok();
    let obfuscated = port.len() > 1
        && port.starts_with('_')
        && port
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    digits || obfuscated
}

/// Layer that resolves the client's address behind [`TrustedProxies`] and inserts it as
/// [`ClientIp`]. See the [module docs](self).
///
/// The peer is the request's [`ClientIp`] extension if the host already set one (it is
/// replaced by the resolved address), else its [`SocketAddr`] extension (with axum, map
/// `ConnectInfo<SocketAddr>` to it). A request with neither is passed on unchanged. Nothing
/// is removed from the request: the forwarding headers go on as they came.
///
/// Put it outside [`AuditLayer`](crate::AuditLayer) (first in a `ServiceBuilder`), so that
/// the audit record's `client_ip` is the resolved address too, not only
/// [`KeyAuth`](crate::KeyAuth)'s check.
#[derive(Clone, Debug, Default)]
pub struct ResolveClientIpLayer {
    trusted: TrustedProxies,
}

impl ResolveClientIpLayer {
    /// Resolves behind `trusted`.
    pub fn new(trusted: TrustedProxies) -> Self {
        ResolveClientIpLayer { trusted }
    }
}

impl<S> Layer<S> for ResolveClientIpLayer {
    type Service = ResolveClientIp<S>;

    fn layer(&self, inner: S) -> ResolveClientIp<S> {
        ResolveClientIp::new(inner, self.trusted.clone())
    }
}

/// Middleware that resolves the client's address. See [`ResolveClientIpLayer`].
#[derive(Clone, Debug)]
pub struct ResolveClientIp<S> {
    inner: S,
    trusted: TrustedProxies,
}

impl<S> ResolveClientIp<S> {
    /// Wraps `inner`, resolving behind `trusted`.
    pub fn new(inner: S, trusted: TrustedProxies) -> Self {
        ResolveClientIp { inner, trusted }
    }

    /// A [`ResolveClientIpLayer`] for `trusted`.
    pub fn layer(trusted: TrustedProxies) -> ResolveClientIpLayer {
        ResolveClientIpLayer::new(trusted)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for ResolveClientIp<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let ext = req.extensions();
        let peer = ext
            .get::<ClientIp>()
            .map(|c| c.0)
            .or_else(|| ext.get::<SocketAddr>().map(SocketAddr::ip));
        if let Some(peer) = peer {
            let client = self.trusted.client_ip(peer, req.headers());
            req.extensions_mut().insert(ClientIp(client));
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> TrustedProxies {
        TrustedProxies::new(["10.0.0.0/8", "fd00::/8"].map(|n| n.parse().unwrap()))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn xff(value: &str) -> HeaderMap {
        headers(&[("x-forwarded-for", value)])
    }

    fn fwd(value: &str) -> HeaderMap {
        headers(&[("forwarded", value)])
    }

    const PROXY: &str = "10.0.0.1";

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_sends() {
        let t = trusted();
        assert_eq!(
            t.client_ip(ip("198.51.100.9"), &xff("203.0.113.5")),
            ip("198.51.100.9")
        );
        assert_eq!(
            t.client_ip(ip("198.51.100.9"), &fwd("for=203.0.113.5")),
            ip("198.51.100.9")
        );
    }

    #[test]
    fn with_no_trusted_proxy_headers_are_never_read() {
        let t = TrustedProxies::none();
        assert_eq!(t.client_ip(ip(PROXY), &xff("203.0.113.5")), ip(PROXY));
        assert_eq!(
            t.client_ip(ip("127.0.0.1"), &xff("203.0.113.5")),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn a_trusted_peer_without_a_header_is_the_client() {
        assert_eq!(trusted().client_ip(ip(PROXY), &HeaderMap::new()), ip(PROXY));
    }

    #[test]
    fn x_forwarded_for_from_a_trusted_proxy_names_the_client() {
        assert_eq!(
            trusted().client_ip(ip(PROXY), &xff("203.0.113.5")),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let t = trusted();
        // The left one was sent by the client: ignored.
        assert_eq!(
            t.client_ip(ip(PROXY), &xff("198.51.100.1, 203.0.113.5, 10.0.0.2")),
            ip("203.0.113.5")
        );
        assert_eq!(
            t.client_ip(ip(PROXY), &xff("203.0.113.5,10.1.2.3,10.0.0.2")),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn all_hops_trusted_gives_the_left_most() {
        assert_eq!(
            trusted().client_ip(ip(PROXY), &xff("10.0.0.7, 10.0.0.8, fd00::1")),
            ip("10.0.0.7")
        );
    }

    #[test]
    fn several_lines_are_joined_in_order() {
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.1, 203.0.113.5"),
            ("x-forwarded-for", "10.0.0.3"),
        ]);
        assert_eq!(trusted().client_ip(ip(PROXY), &h), ip("203.0.113.5"));
        let h = headers(&[
            ("forwarded", "for=203.0.113.5"),
            ("forwarded", "for=10.0.0.3, for=10.0.0.4"),
        ]);
        assert_eq!(trusted().client_ip(ip(PROXY), &h), ip("203.0.113.5"));
    }

    #[test]
    fn forwarded_with_ports_quotes_and_ipv6() {
        let t = trusted();
        assert_eq!(
            t.client_ip(ip(PROXY), &fwd(r#"for="[2001:db8::1]:4711""#)),
            ip("2001:db8::1")
        );
        assert_eq!(
            t.client_ip(ip(PROXY), &fwd(r#"for="[2001:db8::1]""#)),
            ip("2001:db8::1")
        );
        assert_eq!(
            t.client_ip(
                ip(PROXY),
                &fwd("For=203.0.113.5:8080;proto=https;by=10.0.0.1")
            ),
            ip("203.0.113.5")
        );
        assert_eq!(
            t.client_ip(
                ip(PROXY),
                &fwd(r#"for=198.51.100.1, for="203.0.113.5:1";host="a,b", for="[fd00::2]""#)
            ),
            ip("203.0.113.5")
        );
        assert_eq!(
            t.client_ip(ip(PROXY), &xff("203.0.113.5:4711")),
            ip("203.0.113.5")
        );
        assert_eq!(
            t.client_ip(ip(PROXY), &xff("[2001:db8::1]:4711")),
            ip("2001:db8::1")
        );
        assert_eq!(
            t.client_ip(ip(PROXY), &xff("2001:db8::1")),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn an_ipv6_peer_of_a_trusted_range_is_trusted() {
        assert_eq!(
            trusted().client_ip(ip("fd00::9"), &xff("2001:db8::7")),
            ip("2001:db8::7")
        );
    }

    #[test]
    fn ipv4_mapped_peers_and_hops_count_as_ipv4() {
        let t = trusted();
        assert!(t.is_trusted(ip("::ffff:10.0.0.1")));
        assert_eq!(
            t.client_ip(ip("::ffff:10.0.0.1"), &xff("203.0.113.5")),
            ip("203.0.113.5")
        );
        assert_eq!(
            t.client_ip(ip(PROXY), &xff("203.0.113.5, ::ffff:10.0.0.2")),
            ip("203.0.113.5")
        );
        // An untrusted mapped peer comes back as IPv4.
        assert_eq!(
            t.client_ip(ip("::ffff:198.51.100.9"), &HeaderMap::new()),
            ip("198.51.100.9")
        );
    }

    #[test]
    fn obfuscated_or_unknown_hops_stop_at_the_last_trusted_one() {
        let t = trusted();
        for value in ["for=_hidden", "for=unknown", r#"for="_x:_y""#] {
            assert_eq!(
                t.client_ip(ip(PROXY), &fwd(&format!("for=203.0.113.5, {value}"))),
                ip(PROXY),
                "{value}"
            );
        }
        // Behind a trusted hop, that hop.
        assert_eq!(
            t.client_ip(
                ip(PROXY),
                &fwd("for=203.0.113.5, for=unknown, for=10.0.0.9")
            ),
            ip("10.0.0.9")
        );
        assert_eq!(
            t.client_ip(ip(PROXY), &xff("203.0.113.5, unknown, 10.0.0.9")),
            ip("10.0.0.9")
        );
    }

    #[test]
    fn malformed_hops_never_pick_an_address_left_of_them() {
        let t = trusted();
        for value in [
            "203.0.113.5, ",
            "203.0.113.5,,",
            "203.0.113.5, not-an-ip",
            "203.0.113.5, 10.0.0.300",
            "203.0.113.5, \"10.0.0.2\"",
            "203.0.113.5, 10.0.0.2:99999",
            "203.0.113.5, fe80::1%eth0",
        ] {
            assert_eq!(t.client_ip(ip(PROXY), &xff(value)), ip(PROXY), "{value}");
        }
        for value in [
            "for=203.0.113.5, proto=https",
            "for=203.0.113.5, for=1.2.3.4;for=10.0.0.2",
            "for=203.0.113.5, for=",
            r#"for=203.0.113.5, for="10.0.0.2"#,
            r#"for=203.0.113.5, for=10.0.0.2""#,
            r#"for=203.0.113.5, for="[2001:db8::1]:80:90""#,
            r#"for=203.0.113.5, for="[2001:db8::1"#,
        ] {
            assert_eq!(t.client_ip(ip(PROXY), &fwd(value)), ip(PROXY), "{value}");
        }
    }

    #[test]
    fn unbalanced_quotes_or_escapes_make_a_forwarded_line_unreadable() {
        let t = trusted();
        // A proxy copied a client's text into a quoted parameter: the element on the right
        // looks well formed but is not where it seems.
        let injected = r#"for=198.51.100.1;host=", for=203.0.113.66;x="""#;
        assert_eq!(t.client_ip(ip(PROXY), &fwd(injected)), ip(PROXY));
        assert_eq!(
            t.client_ip(ip(PROXY), &fwd(r#"for=203.0.113.5;host="a\"b""#)),
            ip(PROXY)
        );
        // The client's own unclosed quote on an earlier line does not reach the proxy's.
        let h = headers(&[
            ("forwarded", "for=\"1.2.3.4"),
            ("forwarded", "for=203.0.113.5"),
        ]);
        assert_eq!(t.client_ip(ip(PROXY), &h), ip("203.0.113.5"));
        // Nor on the same line, the proxy's element appended after it.
        let same_line = r#"for="1.2.3.4, for=203.0.113.5"#;
        assert_eq!(t.client_ip(ip(PROXY), &fwd(same_line)), ip("203.0.113.5"));
        let escaped = r#"for="1.2.3.4\", for=203.0.113.5, for=10.0.0.2"#;
        assert_eq!(t.client_ip(ip(PROXY), &fwd(escaped)), ip("203.0.113.5"));
        // Trusted all the way to the bad character: the last trusted hop.
        let trusted_tail = r#"for="1.2.3.4, for=10.0.0.3, for=10.0.0.2"#;
        assert_eq!(t.client_ip(ip(PROXY), &fwd(trusted_tail)), ip("10.0.0.3"));
        // An earlier line with a bad character is unreadable where the walk reaches it.
        let h = headers(&[
            ("forwarded", r#"for=203.0.113.5;x="a"#),
            ("forwarded", "for=10.0.0.2"),
        ]);
        assert_eq!(t.client_ip(ip(PROXY), &h), ip("10.0.0.2"));
    }

    #[test]
    fn both_headers_present_means_neither_is_believed() {
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.5"),
            ("forwarded", "for=198.51.100.1"),
        ]);
        assert_eq!(trusted().client_ip(ip(PROXY), &h), ip(PROXY));
    }

    #[test]
    fn a_line_that_is_not_visible_ascii_is_unreadable() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.5"));
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"10.0.0.2\xff").unwrap(),
        );
        assert_eq!(trusted().client_ip(ip(PROXY), &h), ip(PROXY));
    }

    #[test]
    fn a_named_header_is_the_only_one_read() {
        let mut both = HeaderMap::new();
        both.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.5"));
        both.append(FORWARDED, HeaderValue::from_static("for=198.51.100.7"));
        // Either: both is neither.
        assert_eq!(trusted().client_ip(ip(PROXY), &both), ip(PROXY));
        let xff = trusted().header(ForwardedHeader::XForwardedFor);
        assert_eq!(xff.client_ip(ip(PROXY), &both), ip("203.0.113.5"));
        let fwd = trusted().header(ForwardedHeader::Forwarded);
        assert_eq!(fwd.client_ip(ip(PROXY), &both), ip("198.51.100.7"));
        // The other header alone is not read.
        let mut only_forwarded = HeaderMap::new();
        only_forwarded.append(FORWARDED, HeaderValue::from_static("for=198.51.100.7"));
        assert_eq!(xff.client_ip(ip(PROXY), &only_forwarded), ip(PROXY));
        let mut only_xff = HeaderMap::new();
        only_xff.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.5"));
        assert_eq!(fwd.client_ip(ip(PROXY), &only_xff), ip(PROXY));
    }

    #[test]
    fn a_client_byte_that_is_not_visible_ascii_does_not_hide_the_hops_right_of_it() {
        // The client sent a non-ASCII byte; its proxy appended the client's address: the
        // client is still found (it cannot hide behind the proxy's address).
        let cases: [(HeaderName, &[u8], &[u8]); 2] = [
            (
                X_FORWARDED_FOR,
                b"1.2.3.4\xff, 203.0.113.5",
                b"9.9.9.9, 1.2.3.4\xff, 10.0.0.2",
            ),
            (
                FORWARDED,
                b"for=1.2.3.4\xff, for=203.0.113.5",
                b"for=9.9.9.9, for=1.2.3.4\xff, for=10.0.0.2",
            ),
        ];
        for (name, appended, all_trusted_after) in cases {
            let mut h = HeaderMap::new();
            h.append(name.clone(), HeaderValue::from_bytes(appended).unwrap());
            assert_eq!(trusted().client_ip(ip(PROXY), &h), ip("203.0.113.5"));
            // The bad element itself is never read, nor anything left of it.
            let mut h = HeaderMap::new();
            h.append(name, HeaderValue::from_bytes(all_trusted_after).unwrap());
            assert_eq!(trusted().client_ip(ip(PROXY), &h), ip("10.0.0.2"));
        }
    }

    #[test]
    fn a_long_chain_is_walked_only_up_to_the_cap() {
        let t = trusted().max_hops(3);
        assert_eq!(
            t.client_ip(ip(PROXY), &xff("203.0.113.5, 10.0.0.4, 10.0.0.3, 10.0.0.2")),
            ip("10.0.0.4")
        );
        assert_eq!(
            t.client_ip(ip(PROXY), &xff("203.0.113.5, 10.0.0.3, 10.0.0.2")),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn a_ten_thousand_hop_header_is_cheap() {
        let t = trusted();
        let long = vec!["10.0.0.2"; 10_000].join(", ");
        let start = std::time::Instant::now();
        for _ in 0..100 {
            assert_eq!(t.client_ip(ip(PROXY), &xff(&long)), ip("10.0.0.2"));
            assert_eq!(
                t.client_ip(ip(PROXY), &fwd(&long.replace("10.", "for=10."))),
                ip("10.0.0.2")
            );
        }
        // Linear in the header (the quote count), not in hops × length: far below a second.
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn an_x_forwarded_for_quote_does_not_join_hops() {
        assert_eq!(
            trusted().client_ip(ip(PROXY), &xff("\"1.2.3.4, 203.0.113.5")),
            ip("203.0.113.5")
        );
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics_and_an_untrusted_peer_is_kept(
            lines in proptest::collection::vec("[ -~]{0,80}", 0..4),
            use_forwarded: bool,
            peer_trusted: bool,
        ) {
            let name = if use_forwarded { "forwarded" } else { "x-forwarded-for" };
            let pairs: Vec<(&str, &str)> = lines.iter().map(|l| (name, l.as_str())).collect();
            let h = headers(&pairs);
            let peer = if peer_trusted { ip(PROXY) } else { ip("198.51.100.9") };
            let got = trusted().client_ip(peer, &h);
            if !peer_trusted {
                proptest::prop_assert_eq!(got, peer);
            }
        }

        #[test]
        fn client_garbage_left_of_the_proxys_hop_changes_nothing(
            garbage in proptest::collection::vec("[ -~]{0,80}", 1..4),
            use_forwarded: bool,
        ) {
            // The proxy adds its own line; whatever the client sent before it is never read.
            let (name, own) = if use_forwarded {
                ("forwarded", "for=\"203.0.113.5:4711\"")
            } else {
                ("x-forwarded-for", "203.0.113.5")
            };
            let mut pairs: Vec<(&str, &str)> = garbage.iter().map(|l| (name, l.as_str())).collect();
            pairs.push((name, own));
            proptest::prop_assert_eq!(trusted().client_ip(ip(PROXY), &headers(&pairs)), ip("203.0.113.5"));
            // Appended on the client's own line too (quotes and all in the client's part).
            let got = if use_forwarded {
                trusted().client_ip(ip(PROXY), &fwd(&format!("{}, for=203.0.113.5", garbage[0])))
            } else {
                trusted().client_ip(ip(PROXY), &xff(&format!("{}, 203.0.113.5", garbage[0])))
            };
            proptest::prop_assert_eq!(got, ip("203.0.113.5"));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                for name in [FORWARDED, X_FORWARDED_FOR] {
                    let mut h = HeaderMap::new();
                    h.insert(name, value.clone());
                    let _ = trusted().client_ip(ip(PROXY), &h);
                }
            }
        }
    }

    #[test]
    fn the_layer_inserts_the_resolved_address_and_keeps_the_headers() {
        use tower::{service_fn, ServiceExt};
        let svc =
            ResolveClientIpLayer::new(trusted()).layer(service_fn(|req: Request<()>| async move {
                assert!(req.headers().contains_key("x-forwarded-for"));
                Ok::<_, std::convert::Infallible>(req.extensions().get::<ClientIp>().copied())
            }));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut req = Request::new(());
            req.headers_mut()
                .insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.5"));
            req.extensions_mut()
                .insert("[::ffff:10.0.0.1]:1234".parse::<SocketAddr>().unwrap());
            let got = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(got, Some(ClientIp(ip("203.0.113.5"))));

            // A `ClientIp` set by the host is the peer.
            let mut req = Request::new(());
            req.headers_mut()
                .insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.5"));
            req.extensions_mut().insert(ClientIp(ip("198.51.100.9")));
            let got = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(got, Some(ClientIp(ip("198.51.100.9"))));

            // No peer known: nothing is inserted.
            let mut req = Request::new(());
            req.headers_mut()
                .insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.5"));
            assert_eq!(svc.oneshot(req).await.unwrap(), None);
        });
    }
}
