//! Console sessions (a random id in an HttpOnly, SameSite=Strict cookie; its CSRF token),
//! the login throttle, and the comparisons in constant time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{header, HeaderMap};
use tower_llm_policy::keys::KeyDigest;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "tlp_console";
/// The login form's double-submit cookie (CSRF protection of the login itself).
pub(crate) const LOGIN_COOKIE: &str = "tlp_console_login";

/// A session ends this long after its last request.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after the login, however busy.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(12 * 60 * 60);
/// Sessions held at once; a login beyond this ends the oldest.
const MAX_SESSIONS: usize = 256;

/// Failed logins from one address within [`THROTTLE_WINDOW`] before its logins are refused
/// (429) until the window ends.
pub(crate) const MAX_FAILURES: u32 = 10;
/// See [`MAX_FAILURES`].
pub(crate) const THROTTLE_WINDOW: Duration = Duration::from_secs(5 * 60);
/// How long a failed login waits before it is answered.
pub(crate) const FAILURE_DELAY: Duration = Duration::from_secs(1);
/// Addresses the throttle remembers at once (beyond, the oldest windows are forgotten).
const MAX_THROTTLED: usize = 4096;

/// 32 random bytes from the operating system, in hexadecimal; `None` without a random source.
pub(crate) fn random_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths only.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Every value of the cookie `name` of the request, in order (a browser sends several of one
/// name when several paths or hosts set it).
pub(crate) fn cookies<'a>(
    headers: &'a HeaderMap,
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(key, _)| *key == name)
        .map(|(_, value)| value.trim())
}

/// A `Set-Cookie` value: `name=value`, HttpOnly, SameSite=Strict, Path=/console, Secure when
/// `secure`; `max_age` (seconds) when given.
pub(crate) fn set_cookie(name: &str, value: &str, secure: bool, max_age: Option<u64>) -> String {
    let mut cookie = format!("{name}={value}; Path=/console; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    if secure {
        cookie.push_str("; Secure");
    }
    cookie
}

/// One logged-in browser.
#[derive(Clone)]
struct Session {
    csrf: String,
    created: Instant,
    seen: Instant,
}

/// The sessions, by the digest of their id (the id itself is kept nowhere on the server).
#[derive(Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<KeyDigest, Session>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.map.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Sessions").field("count", &count).finish()
    }
}

impl Sessions {
    /// A new session: its id (for the cookie) and its CSRF token. `None` without a random
    /// source.
    pub(crate) fn create(&self) -> Option<(String, String)> {
        let id = random_token()?;
        let csrf = random_token()?;
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| live(s, now));
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.created).map(|(d, _)| *d) {
                map.remove(&oldest);
            }
        }
        map.insert(
            KeyDigest::of(&id),
            Session {
                csrf: csrf.clone(),
                created: now,
                seen: now,
            },
        );
        Some((id, csrf))
    }

    /// The CSRF token of the live session `id` (its idle time starts again), or `None`.
    pub(crate) fn get(&self, id: &str) -> Option<String> {
        let digest = KeyDigest::of(id);
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(&digest) {
            Some(session) if live(session, now) => {
                session.seen = now;
                Some(session.csrf.clone())
            }
            Some(_) => {
                map.remove(&digest);
                None
            }
            None => None,
        }
    }

    /// Ends the session `id`.
    pub(crate) fn end(&self, id: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&KeyDigest::of(id));
    }
}

fn live(session: &Session, now: Instant) -> bool {
    now.duration_since(session.seen) < IDLE_TIMEOUT && now.duration_since(session.created) < MAX_AGE
}

/// Failed logins per client: an IPv4 address, or an IPv6 address's /64 (one host has them
/// all). A login counts as failed from the moment its token is compared (see
/// [`Throttle::attempt`]), so logins sent at once cannot outrun the count.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    map: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// The client `ip` is counted as: IPv4 addresses whole (IPv4-mapped IPv6 ones too), IPv6
/// addresses by their /64.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

fn blocked((start, failures): &(Instant, u32), now: Instant) -> bool {
    now.duration_since(*start) < THROTTLE_WINDOW && *failures >= MAX_FAILURES
}

impl Throttle {
    /// Whether `ip` may try to log in now.
    pub(crate) fn allowed(&self, ip: IpAddr) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        !map.get(&client_of(ip))
            .is_some_and(|entry| blocked(entry, Instant::now()))
    }

    /// Takes one of `ip`'s attempts before its token is compared, counted as a failure until
    /// [`Throttle::succeeded`]; `false` (not to be compared) when it has none left. When the
    /// table is full of clients whose windows are still open, a new client is refused until
    /// one ends: forgetting any of them would give its guesses back, so that at most
    /// [`MAX_THROTTLED`] × [`MAX_FAILURES`] tokens are compared per window, however many
    /// addresses the guesses come from.
    pub(crate) fn attempt(&self, ip: IpAddr) -> bool {
        let client = client_of(ip);
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&client) && map.len() >= MAX_THROTTLED {
            map.retain(|_, (start, _)| now.duration_since(*start) < THROTTLE_WINDOW);
            if map.len() >= MAX_THROTTLED {
                return false;
            }
        }
        let entry = map.entry(client).or_insert((now, 0));
        if now.duration_since(entry.0) >= THROTTLE_WINDOW {
            *entry = (now, 0);
        }
        if entry.1 >= MAX_FAILURES {
            return false;
        }
        entry.1 += 1;
        true
    }

    /// Forgets `ip`'s failures (after a successful login).
    pub(crate) fn succeeded(&self, ip: IpAddr) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&client_of(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_compared_whole() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(ct_eq(a.as_bytes(), a.clone().as_bytes()));
        assert!(!ct_eq(a.as_bytes(), b.as_bytes()));
        assert!(!ct_eq(a.as_bytes(), &a.as_bytes()[..63]));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn sessions_live_until_ended() {
        let sessions = Sessions::default();
        let (id, csrf) = sessions.create().unwrap();
        assert_eq!(sessions.get(&id).as_deref(), Some(csrf.as_str()));
        assert_eq!(sessions.get("forged"), None);
        sessions.end(&id);
        assert_eq!(sessions.get(&id), None);
    }

    #[test]
    fn cookies_are_read_from_any_cookie_header() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, "a=1; tlp_console=abc".parse().unwrap());
        headers.append(header::COOKIE, "b=2".parse().unwrap());
        headers.append(header::COOKIE, "tlp_console=def".parse().unwrap());
        let all = |name| cookies(&headers, name).collect::<Vec<_>>();
        assert_eq!(all(COOKIE), ["abc", "def"]);
        assert_eq!(all("b"), ["2"]);
        assert!(all("c").is_empty());
        let set = set_cookie(COOKIE, "v", true, None);
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        assert!(set.contains("Path=/console") && set.ends_with("; Secure"));
        assert!(!set_cookie(COOKIE, "v", false, Some(0)).contains("Secure"));
    }

    #[test]
    fn too_many_failures_stop_logins_from_that_address() {
        let throttle = Throttle::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(throttle.allowed(ip));
            assert!(throttle.attempt(ip));
        }
        assert!(!throttle.allowed(ip));
        assert!(!throttle.attempt(ip));
        assert!(throttle.allowed("192.0.2.2".parse().unwrap()));
        throttle.succeeded(ip);
        assert!(throttle.allowed(ip));
    }

    #[test]
    fn a_full_table_forgets_no_client() {
        let throttle = Throttle::default();
        let ip = |i: usize| IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        for i in 0..MAX_THROTTLED {
            let failures = if i == 1 { 1 } else { MAX_FAILURES };
            for _ in 0..failures {
                assert!(throttle.attempt(ip(i)));
            }
        }
        // A new client finds the table full: refused, and nobody forgotten (not even a client
        // with attempts left, which would get its failures back).
        assert!(!throttle.attempt(ip(MAX_THROTTLED)));
        assert!(!throttle.allowed(ip(0)));
        assert!(!throttle.attempt(ip(0)));
        for _ in 1..MAX_FAILURES {
            assert!(throttle.attempt(ip(1)));
        }
        assert!(!throttle.attempt(ip(1)));
    }

    #[test]
    fn an_ipv6_prefix_is_one_client() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(client_of(a), client_of(b));
        assert_ne!(client_of(a), client_of("2001:db8:1:3::1".parse().unwrap()));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_of(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }
}
