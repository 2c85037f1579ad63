//! The console's HTML: one escaping helper that every interpolated value goes through, the
//! page layout, and the responses (headers included) every console page is sent with.
//!
//! No templating crate: the pages are small, written with `format!` and [`esc`], and the
//! rule is simple to check by reading — every `{}` of a value that is not a literal of this
//! module is `esc(..)` (or a number).

use std::fmt::Write as _;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::stack::ProxyBody;

/// The Content-Security-Policy of every console response: scripts and styles from the
/// console's own embedded files only (no inline script or style), no frames, forms posting
/// back to the console only.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// `text` escaped for HTML text and for double- or single-quoted attribute values.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` percent-encoded for one URL path segment or query value (everything but the
/// unreserved characters of RFC 3986).
pub(crate) fn url_part(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The navigation's current page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Nav {
    /// The login page: no navigation.
    None,
    Keys,
    Audit,
    Spend,
}

/// A whole page: `title`, the navigation (with the logout form, which needs the session's
/// CSRF token), and `main`, already HTML.
pub(crate) fn layout(title: &str, nav: Nav, csrf: Option<&str>, main: &str) -> String {
    let mut page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · LLM policy console</title>\
         <link rel=\"icon\" href=\"/console/assets/icon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/console/assets/console.css\">\
         <script src=\"/console/assets/console.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a><header><span class=\"brand\">LLM policy console</span>",
        esc(title)
    );
    if nav != Nav::None {
        page.push_str("<nav aria-label=\"Console\"><ul>");
        for (item, href, label) in [
            (Nav::Keys, "/console/keys", "API keys"),
            (Nav::Audit, "/console/audit", "Audit log"),
            (Nav::Spend, "/console/spend", "Spend"),
        ] {
            let current = if item == nav {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(page, "<li><a href=\"{href}\"{current}>{label}</a></li>");
        }
        page.push_str("</ul>");
        if let Some(csrf) = csrf {
            let _ = write!(
                page,
                "<form method=\"post\" action=\"/console/logout\" class=\"logout\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <button type=\"submit\">Log out</button></form>",
                esc(csrf)
            );
        }
        page.push_str("</nav>");
    }
    let _ = writeln!(
        page,
        "</header><main id=\"main\" tabindex=\"-1\"><h1>{}</h1>{main}</main></body></html>",
        esc(title)
    );
    page
}

/// The headers every console response carries: no caching, no framing, no sniffing, the CSP.
pub(crate) fn secure_headers<B>(response: &mut Response<B>) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

fn body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An HTML page with `status`.
pub(crate) fn html(status: StatusCode, page: String) -> Response<ProxyBody> {
    let mut response = Response::new(body(page));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure_headers(&mut response);
    response
}

/// A `303 See Other` to `location` (a path of the console).
pub(crate) fn redirect(location: &str) -> Response<ProxyBody> {
    let mut response = Response::new(body(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    secure_headers(&mut response);
    response
}

/// A page that says what went wrong, with a link onwards, and `status`.
pub(crate) fn message(
    status: StatusCode,
    title: &str,
    text: &str,
    back: (&str, &str),
    nav: Nav,
    csrf: Option<&str>,
) -> Response<ProxyBody> {
    let main = format!(
        "<p class=\"notice error\" role=\"alert\">{}</p><p><a href=\"{}\">{}</a></p>",
        esc(text),
        esc(back.0),
        esc(back.1)
    );
    html(status, layout(title, nav, csrf, &main))
}

/// An embedded static file.
pub(crate) fn asset(content_type: &'static str, bytes: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(body(Bytes::from_static(bytes.as_bytes())));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=300"),
    );
    secure_headers(&mut response);
    response
}

/// A dollar amount: cents for amounts of a dollar or more, more digits below.
pub(crate) fn usd(amount: f64) -> String {
    if !amount.is_finite() {
        return "-".to_owned();
    }
    if amount == 0.0 {
        "$0".to_owned()
    } else if amount.abs() >= 1.0 {
        format!("${amount:.2}")
    } else {
        let fixed = format!("{amount:.6}");
        format!("${}", fixed.trim_end_matches('0').trim_end_matches('.'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_special_character_is_escaped() {
        assert_eq!(
            esc("<script>alert('x') & \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
        assert_eq!(esc("plain-name_1"), "plain-name_1");
    }

    #[test]
    fn url_parts_are_percent_encoded() {
        assert_eq!(url_part("a b/c?d#é"), "a%20b%2Fc%3Fd%23%C3%A9");
        assert_eq!(url_part("chat-app_1.x~"), "chat-app_1.x~");
    }

    #[test]
    fn dollars_are_readable() {
        assert_eq!(usd(0.0), "$0");
        assert_eq!(usd(12.345), "$12.35");
        assert_eq!(usd(0.00042), "$0.00042");
        assert_eq!(usd(f64::NAN), "-");
    }
}
