//! The audit pages (a paged, filterable table; one whole record) and the spend page (spend
//! per key per day as a chart, totals per model), read from the audit log.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Response, StatusCode};
use serde_json::Value;

use super::data::{day_of, has_flags, AuditQuery, NO_KEY};
use super::html::{self, esc, url_part, usd, Nav};
use super::keys::short_time;
use super::{Console, Session};
use crate::admin::param;
use crate::stack::ProxyBody;

fn page(
    session: &Session,
    nav: Nav,
    title: &str,
    status: StatusCode,
    main: &str,
) -> Response<ProxyBody> {
    html::html(status, html::layout(title, nav, Some(&session.csrf), main))
}

fn no_log(session: &Session, nav: Nav, title: &str) -> Response<ProxyBody> {
    page(
        session,
        nav,
        title,
        StatusCode::OK,
        "<p class=\"notice\">There is no audit log to read: set <code>[audit] jsonl</code> \
         (a JSON Lines file) or <code>[audit] postgres_url</code> in the configuration.</p>",
    )
}

fn unavailable(session: &Session, nav: Nav, title: &str, e: &str) -> Response<ProxyBody> {
    tracing::warn!(target: "example_proxy::console", error = %e, "console: the audit log could not be read");
    page(
        session,
        nav,
        title,
        StatusCode::SERVICE_UNAVAILABLE,
        "<p class=\"notice error\" role=\"alert\">The audit log could not be read; try again.</p>",
    )
}

fn text<'a>(record: &'a Value, field: &str) -> Option<&'a str> {
    record.get(field).and_then(Value::as_str)
}

fn filled(params: &[(String, String)], name: &str) -> Option<String> {
    param(params, name)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// `GET /console/audit`.
pub(super) async fn list(
    console: &Console,
    session: &Session,
    params: &[(String, String)],
) -> Response<ProxyBody> {
    const TITLE: &str = "Audit log";
    if !console.audit.is_some() {
        return no_log(session, Nav::Audit, TITLE);
    }
    let status = match filled(params, "status").map(|s| s.parse::<u16>()) {
        None => None,
        Some(Ok(status)) => Some(status),
        Some(Err(_)) => {
            return html::message(
                StatusCode::BAD_REQUEST,
                TITLE,
                "The status filter is a number (403).",
                ("/console/audit", "All records"),
                Nav::Audit,
                Some(&session.csrf),
            )
        }
    };
    let page_no = match param(params, "page").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) if n <= 10_000 => n,
        _ => {
            return html::message(
                StatusCode::BAD_REQUEST,
                TITLE,
                "The page is a number.",
                ("/console/audit", "All records"),
                Nav::Audit,
                Some(&session.csrf),
            )
        }
    };
    let query = AuditQuery {
        key: filled(params, "key"),
        model: filled(params, "model"),
        status,
        user: filled(params, "user"),
        blocked: param(params, "blocked").is_some(),
        flagged: param(params, "flagged").is_some(),
        page: page_no,
    };
    let result = match console.audit.page(&query).await {
        Ok(result) => result,
        Err(e) => return unavailable(session, Nav::Audit, TITLE, &e),
    };
    let value = |v: &Option<String>| esc(v.as_deref().unwrap_or_default());
    let check = |on: bool| if on { " checked" } else { "" };
    let mut main = format!(
        "<p class=\"hint\">From {}. Newest first; refused requests are marked <span class=\"badge blocked\">blocked</span>, \
         flagged ones <span class=\"badge flagged\">flagged</span>. Open a row for its whole record.</p>\
         <form method=\"get\" action=\"/console/audit\" class=\"filters\" role=\"search\">\
         <div class=\"field\"><label for=\"f-key\">Key</label><input id=\"f-key\" name=\"key\" value=\"{}\"></div>\
         <div class=\"field\"><label for=\"f-model\">Model</label><input id=\"f-model\" name=\"model\" value=\"{}\"></div>\
         <div class=\"field\"><label for=\"f-status\">Status</label><input id=\"f-status\" name=\"status\" inputmode=\"numeric\" value=\"{}\"></div>\
         <div class=\"field\"><label for=\"f-user\">User</label><input id=\"f-user\" name=\"user\" value=\"{}\"></div>\
         <label class=\"toggle\"><input type=\"checkbox\" name=\"blocked\" value=\"1\"{}> Blocked only</label>\
         <label class=\"toggle\"><input type=\"checkbox\" name=\"flagged\" value=\"1\"{}> Flagged only</label>\
         <button type=\"submit\">Filter</button></form>",
        esc(&console.audit.describe()),
        value(&query.key),
        value(&query.model),
        query.status.map(|s| s.to_string()).unwrap_or_default(),
        value(&query.user),
        check(query.blocked),
        check(query.flagged),
    );
    if result.rows.is_empty() {
        main.push_str("<p>No records match.</p>");
    } else {
        main.push_str(
            "<div class=\"table-wrap\"><table class=\"audit cards\"><caption>Audit records</caption><thead><tr>\
             <th scope=\"col\">Time</th><th scope=\"col\">Key</th><th scope=\"col\">Model</th>\
             <th scope=\"col\">Status</th><th scope=\"col\">Blocked by</th><th scope=\"col\">Flags</th>\
             <th scope=\"col\">Tokens</th><th scope=\"col\">Cost</th><th scope=\"col\">User</th></tr></thead><tbody>",
        );
        for record in &result.rows {
            let blocked = text(record, "blocked_by");
            let flagged = has_flags(record);
            let mut classes = Vec::new();
            let mut marks = String::new();
            if blocked.is_some() {
                classes.push("blocked");
                marks.push_str(" <span class=\"badge blocked\">blocked</span>");
            }
            if flagged {
                classes.push("flagged");
                marks.push_str(" <span class=\"badge flagged\">flagged</span>");
            }
            let id = text(record, "request_id").unwrap_or_default();
            let url = format!("/console/audit/{}", url_part(id));
            let time = short_time(text(record, "timestamp").unwrap_or_default());
            let blocked_by = match (blocked, text(record, "code")) {
                (Some(layer), Some(code)) => format!("{layer}: {code}"),
                (Some(layer), None) => layer.to_owned(),
                _ => String::new(),
            };
            let flags: Vec<&str> = record
                .get("flags")
                .and_then(Value::as_array)
                .map(|f| f.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let count = |f: &str| record.get(f).and_then(Value::as_u64);
            let tokens = match (count("prompt_tokens"), count("completion_tokens")) {
                (None, None) => String::new(),
                (p, c) => format!(
                    "{}+{}",
                    p.map_or("?".into(), |n| n.to_string()),
                    c.map_or("?".into(), |n| n.to_string())
                ),
            };
            let cost = record
                .get("cost_usd")
                .and_then(Value::as_f64)
                .map(usd)
                .unwrap_or_default();
            let status = record
                .get("status")
                .and_then(Value::as_u64)
                .map_or_else(|| "-".to_owned(), |s| s.to_string());
            let _ = write!(
                main,
                "<tr class=\"{}\" data-href=\"{url}\"><td data-label=\"Time\"><a href=\"{url}\">{}</a>{marks}</td>\
                 <td data-label=\"Key\">{}</td><td data-label=\"Model\">{}</td><td data-label=\"Status\">{}</td>\
                 <td data-label=\"Blocked by\">{}</td><td data-label=\"Flags\">{}</td><td data-label=\"Tokens\">{}</td>\
                 <td data-label=\"Cost\">{}</td><td data-label=\"User\">{}</td></tr>",
                classes.join(" "),
                esc(&time),
                esc(text(record, "key").unwrap_or(NO_KEY)),
                esc(text(record, "model").unwrap_or_default()),
                esc(&status),
                esc(&blocked_by),
                esc(&flags.join(", ")),
                esc(&tokens),
                esc(&cost),
                esc(text(record, "user").unwrap_or_default()),
                url = esc(&url),
            );
        }
        main.push_str("</tbody></table></div>");
    }
    // Paging, with the filters kept.
    let mut keep = String::new();
    for (name, v) in [
        ("key", &query.key),
        ("model", &query.model),
        ("user", &query.user),
    ] {
        if let Some(v) = v {
            let _ = write!(keep, "&{name}={}", url_part(v));
        }
    }
    if let Some(status) = query.status {
        let _ = write!(keep, "&status={status}");
    }
    if query.blocked {
        keep.push_str("&blocked=1");
    }
    if query.flagged {
        keep.push_str("&flagged=1");
    }
    main.push_str("<nav class=\"pager\" aria-label=\"Pages\">");
    if page_no > 0 {
        let _ = write!(
            main,
            "<a href=\"{}\" rel=\"prev\">Newer</a> ",
            esc(&format!("/console/audit?page={}{keep}", page_no - 1))
        );
    }
    let _ = write!(main, "<span>Page {}</span>", page_no + 1);
    if result.has_more {
        let _ = write!(
            main,
            " <a href=\"{}\" rel=\"next\">Older</a>",
            esc(&format!("/console/audit?page={}{keep}", page_no + 1))
        );
    }
    main.push_str("</nav>");
    page(session, Nav::Audit, TITLE, StatusCode::OK, &main)
}

/// `GET /console/audit/<request_id>`: the whole record.
pub(super) async fn record(console: &Console, session: &Session, id: &str) -> Response<ProxyBody> {
    const TITLE: &str = "Audit record";
    if !console.audit.is_some() {
        return no_log(session, Nav::Audit, TITLE);
    }
    let record = match console.audit.record(id).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            return html::message(
                StatusCode::NOT_FOUND,
                TITLE,
                "No record has this request id (in the part of the log the console reads).",
                ("/console/audit", "Back to the audit log"),
                Nav::Audit,
                Some(&session.csrf),
            )
        }
        Err(e) => return unavailable(session, Nav::Audit, TITLE, &e),
    };
    let mut main = String::from("<dl class=\"facts\">");
    for (label, field) in [
        ("Request id", "request_id"),
        ("Time", "timestamp"),
        ("Key", "key"),
        ("Model", "model"),
        ("Blocked by", "blocked_by"),
        ("Code", "code"),
        ("User", "user"),
    ] {
        if let Some(v) = text(&record, field) {
            let _ = write!(main, "<dt>{label}</dt><dd>{}</dd>", esc(v));
        }
    }
    if let Some(status) = record.get("status").and_then(Value::as_u64) {
        let _ = write!(main, "<dt>Status</dt><dd>{status}</dd>");
    }
    main.push_str("</dl>");
    if text(&record, "blocked_by").is_some() {
        main.push_str("<p><span class=\"badge blocked\">blocked</span></p>");
    }
    if has_flags(&record) {
        main.push_str("<p><span class=\"badge flagged\">flagged</span></p>");
    }
    let pretty = serde_json::to_string_pretty(&record).unwrap_or_default();
    let _ = write!(
        main,
        "<h2>The whole record</h2><pre class=\"record\" tabindex=\"0\">{}</pre>\
         <p><a href=\"/console/audit\">Back to the audit log</a></p>",
        esc(&pretty)
    );
    page(session, Nav::Audit, TITLE, StatusCode::OK, &main)
}

/// The chart's colours, one per key (the rest are "other keys").
const COLOURS: [&str; 8] = [
    "#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626",
];
const OTHER_COLOUR: &str = "#6b7280";

/// `GET /console/spend?days=30`.
pub(super) async fn spend(
    console: &Console,
    session: &Session,
    params: &[(String, String)],
) -> Response<ProxyBody> {
    const TITLE: &str = "Spend";
    if !console.audit.is_some() {
        return no_log(session, Nav::Spend, TITLE);
    }
    let days = match param(params, "days").map(str::parse::<u64>) {
        None => 30,
        Some(Ok(days)) if (1..=366).contains(&days) => days,
        _ => {
            return html::message(
                StatusCode::BAD_REQUEST,
                TITLE,
                "`days` is a number from 1 to 366.",
                ("/console/spend", "The last 30 days"),
                Nav::Spend,
                Some(&session.csrf),
            )
        }
    };
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let tomorrow = UNIX_EPOCH + Duration::from_secs(secs - secs % 86_400 + 86_400);
    let from = tomorrow - Duration::from_secs(days * 86_400);
    let spend = match console.audit.spend(from, tomorrow).await {
        Ok(spend) => spend,
        Err(e) => return unavailable(session, Nav::Spend, TITLE, &e),
    };
    let day_list: Vec<String> = (0..days)
        .map(|i| day_of(from + Duration::from_secs(i * 86_400)))
        .collect();
    // Keys by their spend over the range, most first; beyond the palette, "other keys".
    let mut per_key: BTreeMap<&str, f64> = BTreeMap::new();
    for ((_, key), cost) in &spend.per_day_key {
        *per_key.entry(key.as_str()).or_default() += cost;
    }
    let mut ranked: Vec<(&str, f64)> = per_key.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let shown: Vec<&str> = ranked.iter().take(COLOURS.len()).map(|(k, _)| *k).collect();
    let colour = |key: &str| {
        shown
            .iter()
            .position(|k| *k == key)
            .map_or(OTHER_COLOUR, |i| COLOURS[i])
    };
    let mut stacks: BTreeMap<&str, Vec<(&str, f64)>> = BTreeMap::new();
    for ((day, key), cost) in &spend.per_day_key {
        stacks
            .entry(day.as_str())
            .or_default()
            .push((key.as_str(), *cost));
    }
    let max = stacks
        .values()
        .map(|s| s.iter().map(|(_, c)| c).sum::<f64>())
        .fold(0.0_f64, f64::max);

    let mut main = format!(
        "<form method=\"get\" action=\"/console/spend\" class=\"filters\"><div class=\"field\"><label for=\"days\">Days</label>\
         <input id=\"days\" name=\"days\" type=\"number\" min=\"1\" max=\"366\" value=\"{days}\"></div><button type=\"submit\">Show</button></form>\
         <p class=\"hint\">From {}: the requests' <code>cost_usd</code>, per UTC day.</p>",
        esc(&console.audit.describe())
    );
    // The chart: stacked bars, one per day, one colour per key.
    let (width, height, left, bottom) = (760.0_f64, 260.0_f64, 64.0_f64, 24.0_f64);
    let plot_w = width - left - 8.0;
    let plot_h = height - bottom - 10.0;
    let slot = plot_w / days as f64;
    let bar = (slot * 0.8).max(1.0);
    let total: f64 = ranked.iter().map(|(_, c)| c).sum();
    let _ = write!(
        main,
        "<figure class=\"chart\"><svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-labelledby=\"chart-title\" class=\"spend-chart\">\
         <title id=\"chart-title\">Spend per key per day over the last {days} days: {} in all</title>\
         <line x1=\"{left}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"#9ca3af\"/>\
         <text x=\"{lx}\" y=\"16\" text-anchor=\"end\" font-size=\"11\" fill=\"#374151\">{}</text>\
         <text x=\"{lx}\" y=\"{y0}\" text-anchor=\"end\" font-size=\"11\" fill=\"#374151\">$0</text>",
        esc(&usd(total)),
        esc(&usd(max)),
        y0 = height - bottom,
        x1 = width - 8.0,
        lx = left - 6.0,
    );
    for (i, day) in day_list.iter().enumerate() {
        let x = left + i as f64 * slot + (slot - bar) / 2.0;
        if i % (days as usize / 6).max(1) == 0 {
            let _ = write!(
                main,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#374151\">{}</text>",
                x,
                height - 6.0,
                esc(day.get(5..).unwrap_or_default())
            );
        }
        let Some(stack) = stacks.get(day.as_str()) else {
            continue;
        };
        let mut y = height - bottom;
        for (key, cost) in stack {
            if max <= 0.0 || *cost <= 0.0 {
                continue;
            }
            let h = (cost / max * plot_h).max(1.0);
            y -= h;
            let _ = write!(
                main,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{h:.1}\" fill=\"{}\" data-key=\"{}\" data-day=\"{}\">\
                 <title>{}, {}: {}</title></rect>",
                colour(key),
                esc(key),
                esc(day),
                esc(key),
                esc(day),
                esc(&usd(*cost))
            );
        }
    }
    main.push_str("</svg><figcaption><ul class=\"legend\">");
    for (key, cost) in ranked.iter().take(COLOURS.len()).filter(|(_, c)| *c > 0.0) {
        let _ = write!(
            main,
            "<li><svg width=\"12\" height=\"12\" aria-hidden=\"true\"><rect width=\"12\" height=\"12\" fill=\"{}\"/></svg> {} <span class=\"hint\">{}</span></li>",
            colour(key),
            esc(key),
            esc(&usd(*cost))
        );
    }
    if ranked.len() > COLOURS.len() {
        let rest: f64 = ranked.iter().skip(COLOURS.len()).map(|(_, c)| c).sum();
        let _ = write!(
            main,
            "<li><svg width=\"12\" height=\"12\" aria-hidden=\"true\"><rect width=\"12\" height=\"12\" fill=\"{OTHER_COLOUR}\"/></svg> Other keys <span class=\"hint\">{}</span></li>",
            esc(&usd(rest))
        );
    }
    if total <= 0.0 {
        main.push_str("<li>No spend in these days.</li>");
    }
    main.push_str("</ul></figcaption></figure>");

    // The same numbers as a table (per key per day, the days with spend).
    let keys_with_spend: BTreeSet<&str> = spend
        .per_day_key
        .iter()
        .filter(|(_, c)| **c > 0.0)
        .map(|((_, k), _)| k.as_str())
        .collect();
    if !keys_with_spend.is_empty() {
        main.push_str(
            "<details><summary>Spend per key per day as a table</summary><div class=\"table-wrap\"><table>\
             <thead><tr><th scope=\"col\">Day</th><th scope=\"col\">Key</th><th scope=\"col\">Spend</th></tr></thead><tbody>",
        );
        for ((day, key), cost) in spend.per_day_key.iter().rev() {
            if *cost > 0.0 {
                let _ = write!(
                    main,
                    "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(day),
                    esc(key),
                    esc(&usd(*cost))
                );
            }
        }
        main.push_str("</tbody></table></div></details>");
    }

    main.push_str(
        "<h2>Totals per model</h2><div class=\"table-wrap\"><table class=\"models\"><thead><tr>\
         <th scope=\"col\">Model</th><th scope=\"col\">Requests</th><th scope=\"col\">Prompt tokens</th>\
         <th scope=\"col\">Completion tokens</th><th scope=\"col\">Cost</th></tr></thead><tbody>",
    );
    for model in &spend.models {
        let _ = write!(
            main,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&model.model),
            model.requests,
            model.prompt_tokens,
            model.completion_tokens,
            esc(&usd(model.cost_usd))
        );
    }
    if spend.models.is_empty() {
        main.push_str("<tr><td colspan=\"5\">No requests in these days.</td></tr>");
    }
    main.push_str("</tbody></table></div>");
    page(session, Nav::Spend, TITLE, StatusCode::OK, &main)
}
