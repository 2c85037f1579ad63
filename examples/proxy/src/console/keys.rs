//! The keys pages: the list, a new key (its secret shown once), the editor of every policy
//! field, disable/enable, delete. Every change goes through the admin API's
//! [`KeyAdmin`](tower_llm_policy::keys::KeyAdmin).

use std::fmt::Write as _;
use std::time::SystemTime;

use http::{Response, StatusCode};
use serde_json::{json, Map, Value};
use tower_llm_policy::keys::{AdminError, KeyRecord, PageRequest};
use tower_llm_policy::quota::BudgetPeriod;
use tower_llm_policy::{ApiKey, Feature, FeatureSet};

use super::data::rfc3339;
use super::html::{self, esc, url_part, usd, Nav};
use super::{Console, Form, Session};
use crate::admin::param;
use crate::stack::ProxyBody;

/// Keys per page of the list.
const KEYS_PER_PAGE: usize = 50;

/// What the editor says under its title, and after every save.
const TAKES_EFFECT: &str = "A change takes effect on the key's next request.";

fn key_url(name: &str) -> String {
    format!("/console/keys/{}", url_part(name))
}

fn page(session: &Session, title: &str, status: StatusCode, main: &str) -> Response<ProxyBody> {
    html::html(
        status,
        html::layout(title, Nav::Keys, Some(&session.csrf), main),
    )
}

fn problem(session: &Session, status: StatusCode, text: &str, back: &str) -> Response<ProxyBody> {
    html::message(
        status,
        "Not done",
        text,
        (back, "Back"),
        Nav::Keys,
        Some(&session.csrf),
    )
}

/// The page for an admin error.
fn admin_problem(session: &Session, e: &AdminError, back: &str) -> Response<ProxyBody> {
    let status = match e {
        AdminError::NotFound(_) => StatusCode::NOT_FOUND,
        AdminError::Conflict(_) => StatusCode::CONFLICT,
        AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
        AdminError::ReadOnly => StatusCode::METHOD_NOT_ALLOWED,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let text = match e {
        AdminError::Store(_) => {
            tracing::warn!(target: "example_proxy::console", error = %e, "console: the key store failed");
            "The key store could not answer; try again.".to_owned()
        }
        e => e.to_string(),
    };
    problem(session, status, &text, back)
}

fn flash(text: &str) -> String {
    format!("<p class=\"notice ok\" role=\"status\">{}</p>", esc(text))
}

/// `GET /console/keys`.
pub(super) async fn list(
    console: &Console,
    session: &Session,
    params: &[(String, String)],
) -> Response<ProxyBody> {
    let request = PageRequest {
        after: param(params, "after").map(str::to_owned),
        limit: Some(KEYS_PER_PAGE),
    };
    let keys = match console.admin.keys().list(request).await {
        Ok(keys) => keys,
        Err(e) => return admin_problem(session, &e, "/console/keys"),
    };
    let names: Vec<String> = keys.keys.iter().map(|r| r.key.name.clone()).collect();
    let now = SystemTime::now();
    let (usage, usage_problem) = match console.audit.key_usage(&names, now).await {
        Ok(usage) => (usage, None),
        Err(e) => {
            tracing::warn!(target: "example_proxy::console", error = %e, "console: spend per key unavailable");
            (Default::default(), Some(e))
        }
    };
    let mut main = String::new();
    if let Some(deleted) = param(params, "deleted") {
        main.push_str(&flash(&format!("Key {deleted} deleted.")));
    }
    main.push_str(
        "<p class=\"actions\"><a class=\"button\" href=\"/console/new-key\">New key</a></p>",
    );
    if usage_problem.is_some() {
        main.push_str(
            "<p class=\"notice error\">Spend is unavailable: the audit log could not be read.</p>",
        );
    } else if !console.audit.is_some() {
        main.push_str("<p class=\"hint\">Spend and last use come from the audit log: set <code>[audit] jsonl</code> or <code>[audit] postgres_url</code>.</p>");
    }
    if keys.keys.is_empty() {
        main.push_str("<p>No keys yet.</p>");
    } else {
        main.push_str(
            "<div class=\"table-wrap\"><table class=\"keys cards\"><caption>API keys</caption><thead><tr>\
             <th scope=\"col\">Name</th><th scope=\"col\">Enabled</th><th scope=\"col\">Models</th>\
             <th scope=\"col\">Spend this period</th><th scope=\"col\">Last used</th>\
             <th scope=\"col\"><span class=\"sr-only\">Actions</span></th></tr></thead><tbody>",
        );
        for record in &keys.keys {
            let key = &record.key;
            let expired = key.expires_at.is_some_and(|at| at <= now);
            let enabled = if key.disabled {
                "<span class=\"badge off\">disabled</span>"
            } else if expired {
                "<span class=\"badge off\">expired</span>"
            } else {
                "<span class=\"badge on\">enabled</span>"
            };
            let models = if !key.model_limits_enabled {
                "all".to_owned()
            } else if key.model_limits.is_empty() {
                "none".to_owned()
            } else {
                esc(&key.model_limits.entries().join(", "))
            };
            let used = usage.get(&key.name);
            let (spent, period) = match key.budget_period {
                BudgetPeriod::Daily => (used.map_or(0.0, |u| u.today), "today"),
                BudgetPeriod::Monthly => (used.map_or(0.0, |u| u.month), "this month"),
                _ => (used.map_or(0.0, |u| u.total), "in all"),
            };
            let cap = key
                .credit_limit_usd
                .map(|cap| format!(" of {}", usd(cap)))
                .unwrap_or_default();
            let last = record
                .last_used_at
                .map(rfc3339)
                .or_else(|| used.and_then(|u| u.last.clone()))
                .map_or_else(|| "never".to_owned(), |t| esc(&short_time(&t)));
            let _ = write!(
                main,
                "<tr><th scope=\"row\" data-label=\"Name\"><a href=\"{url}\">{name}</a></th><td data-label=\"Enabled\">{enabled}</td>\
                 <td data-label=\"Models\">{models}</td><td data-label=\"Spend\">{spent}{cap} <span class=\"hint\">{period}</span></td>\
                 <td data-label=\"Last used\">{last}</td><td><a href=\"{url}\" aria-label=\"Settings of {name}\" class=\"gear\">⚙ Settings</a></td></tr>",
                url = esc(&key_url(&key.name)),
                name = esc(&key.name),
                spent = esc(&usd(spent)),
                cap = esc(&cap),
            );
        }
        main.push_str("</tbody></table></div>");
    }
    if let Some(next) = &keys.next {
        let _ = write!(
            main,
            "<p><a href=\"/console/keys?after={}\">Next keys</a></p>",
            esc(&url_part(next))
        );
    }
    page(session, "API keys", StatusCode::OK, &main)
}

/// `2026-12-03T10:11:12.123Z` as `2026-12-03 10:11:12 UTC`.
pub(super) fn short_time(rfc3339: &str) -> String {
    match (rfc3339.get(..10), rfc3339.get(11..19)) {
        (Some(day), Some(time)) => format!("{day} {time} UTC"),
        _ => rfc3339.to_owned(),
    }
}

/// `GET /console/new-key`.
pub(super) async fn new_key(console: &Console, session: &Session) -> Response<ProxyBody> {
    let form = key_form(console, session, None, &ApiKey::new("")).await;
    page(session, "New key", StatusCode::OK, &form)
}

/// `POST /console/keys`: creates the key, and answers with its secret, this once.
pub(super) async fn create(
    console: &Console,
    session: &Session,
    form: &Form,
) -> Response<ProxyBody> {
    let back = "/console/new-key";
    let Some(name) = form.get("name") else {
        return problem(
            session,
            StatusCode::BAD_REQUEST,
            "A key needs a name.",
            back,
        );
    };
    let mut fields = match policy_fields(console, form) {
        Ok(fields) => fields,
        Err(e) => return problem(session, StatusCode::BAD_REQUEST, &e, back),
    };
    fields.retain(|_, v| !v.is_null());
    fields.insert("name".into(), json!(name));
    let key: ApiKey = match serde_json::from_value(Value::Object(fields)) {
        Ok(key) => key,
        Err(e) => {
            return problem(
                session,
                StatusCode::BAD_REQUEST,
                &format!("Not a valid key: {e}"),
                back,
            )
        }
    };
    let created = match console.admin.keys().create(key).await {
        Ok(created) => created,
        Err(e) => return admin_problem(session, &e, back),
    };
    let name = &created.record.key.name;
    tracing::info!(target: "example_proxy::console", key = %name, "console: key created");
    let main = format!(
        "{}<div class=\"card secret\"><label for=\"secret\">The key of {name}</label>\
         <div class=\"copy-row\"><input id=\"secret\" readonly value=\"{secret}\" spellcheck=\"false\" autocomplete=\"off\">\
         <button type=\"button\" data-copy=\"secret\">Copy</button></div>\
         <p class=\"notice warn\" role=\"alert\">This is the only time the key is shown: only its digest is kept. Copy it now.</p>\
         <p class=\"hint\">Clients send it as <code>Authorization: Bearer …</code> with this proxy's <code>/v1</code> as their base URL.</p></div>\
         <p><a class=\"button\" href=\"{url}\">Edit its settings</a> <a href=\"/console/keys\">Back to the keys</a></p>",
        flash(&format!("Key {} created.", created.record.key.name)),
        name = esc(name),
        secret = esc(&created.secret),
        url = esc(&key_url(name)),
    );
    page(session, "Key created", StatusCode::CREATED, &main)
}

/// `GET /console/keys/<name>`.
pub(super) async fn edit(
    console: &Console,
    session: &Session,
    name: &str,
    params: &[(String, String)],
) -> Response<ProxyBody> {
    let record = match console.admin.keys().get(name).await {
        Ok(record) => record,
        Err(e) => return admin_problem(session, &e, "/console/keys"),
    };
    let mut main = String::new();
    match param(params, "done") {
        Some("saved") => main.push_str(&flash(&format!("Saved. {TAKES_EFFECT}"))),
        Some("disabled") => main.push_str(&flash(&format!("Disabled. {TAKES_EFFECT}"))),
        Some("enabled") => main.push_str(&flash(&format!("Enabled. {TAKES_EFFECT}"))),
        _ => {}
    }
    let _ = write!(
        main,
        "<p class=\"hint\">{}</p><dl class=\"facts\"><dt>Digest</dt><dd><code>{}…</code></dd>{}{}</dl>",
        esc(TAKES_EFFECT),
        esc(&record.digest_prefix),
        time_fact("Created", record.created_at),
        time_fact("Updated", record.updated_at),
    );
    main.push_str(&key_form(console, session, Some(&record), &record.key).await);
    let url = esc(&key_url(name));
    let csrf = esc(&session.csrf);
    let (toggle, label) = if record.key.disabled {
        ("enable", "Enable")
    } else {
        ("disable", "Disable")
    };
    let _ = write!(
        main,
        "<section class=\"card danger\" aria-label=\"Disable or delete\"><h2>Disable or delete</h2>\
         <form method=\"post\" action=\"{url}/{toggle}\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button type=\"submit\">{label} this key</button></form>\
         <p><a class=\"button danger\" href=\"{url}/delete\">Delete this key…</a></p></section>"
    );
    page(
        session,
        &format!("Key {}", record.key.name),
        StatusCode::OK,
        &main,
    )
}

fn time_fact(label: &str, at: Option<SystemTime>) -> String {
    at.map(|at| {
        format!(
            "<dt>{label}</dt><dd>{}</dd>",
            esc(&short_time(&rfc3339(at)))
        )
    })
    .unwrap_or_default()
}

/// `POST /console/keys/<name>`: every field of the form, as one merge patch.
pub(super) async fn save(
    console: &Console,
    session: &Session,
    name: &str,
    form: &Form,
) -> Response<ProxyBody> {
    let back = key_url(name);
    let current = match console.admin.keys().get(name).await {
        Ok(record) => record,
        Err(e) => return admin_problem(session, &e, "/console/keys"),
    };
    let mut patch = match policy_fields(console, form) {
        Ok(fields) => fields,
        Err(e) => return problem(session, StatusCode::BAD_REQUEST, &e, &back),
    };
    // Labels no longer in the form are removed (a merge patch merges objects).
    if let Some(Value::Object(labels)) = patch.get_mut("metadata") {
        for old in current.key.metadata.keys() {
            labels.entry(old.clone()).or_insert(Value::Null);
        }
    }
    match console
        .admin
        .keys()
        .update(name, &Value::Object(patch))
        .await
    {
        Ok(_) => {
            tracing::info!(target: "example_proxy::console", key = %name, "console: key changed");
            html::redirect(&format!("{back}?done=saved"))
        }
        Err(e) => admin_problem(session, &e, &back),
    }
}

/// `POST /console/keys/<name>/{disable,enable,delete}`.
pub(super) async fn action(
    console: &Console,
    session: &Session,
    name: &str,
    action: &str,
) -> Response<ProxyBody> {
    let back = key_url(name);
    let keys = console.admin.keys();
    let result = match action {
        "delete" => keys.delete(name).await.map(|()| "deleted"),
        "disable" => keys.disable(name).await.map(|_| "disabled"),
        _ => keys
            .update(name, &json!({"disabled": false}))
            .await
            .map(|_| "enabled"),
    };
    match result {
        Ok(done) => {
            tracing::info!(target: "example_proxy::console", key = %name, done, "console: key changed");
            if done == "deleted" {
                html::redirect(&format!("/console/keys?deleted={}", url_part(name)))
            } else {
                html::redirect(&format!("{back}?done={done}"))
            }
        }
        Err(e) => admin_problem(session, &e, &back),
    }
}

/// `GET /console/keys/<name>/delete`: asks first.
pub(super) async fn confirm_delete(
    console: &Console,
    session: &Session,
    name: &str,
) -> Response<ProxyBody> {
    if let Err(e) = console.admin.keys().get(name).await {
        return admin_problem(session, &e, "/console/keys");
    }
    let main = format!(
        "<form method=\"post\" action=\"{url}/delete\" class=\"card danger\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <p>Delete the key <strong>{name}</strong>? Its clients are refused from their next request. \
         Its audit records stay.</p>\
         <button type=\"submit\" class=\"danger\">Delete</button> <a href=\"{url}\">Cancel</a></form>",
        url = esc(&key_url(name)),
        csrf = esc(&session.csrf),
        name = esc(name),
    );
    page(session, "Delete key", StatusCode::OK, &main)
}

/// Items of a list field: separated by commas or lines.
fn items(text: Option<&str>) -> Vec<String> {
    text.unwrap_or_default()
        .split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The policy fields of a key's form, as JSON (`null` for a field left empty: the default).
/// Fails, naming the field, on a value that cannot be read.
fn policy_fields(console: &Console, form: &Form) -> Result<Map<String, Value>, String> {
    let mut fields = Map::new();
    let number = |name: &str| -> Result<Value, String> {
        match form.get(name) {
            None => Ok(Value::Null),
            Some(text) => text
                .parse::<u64>()
                .map(|n| json!(n))
                .map_err(|_| format!("`{name}` must be a whole number, zero or more.")),
        }
    };
    for name in [
        "max_prompt_chars",
        "max_prompt_tokens",
        "max_output_tokens",
        "max_n",
        "max_messages",
        "rpm",
        "tpm",
    ] {
        fields.insert(name.into(), number(name)?);
    }
    fields.insert(
        "model_limits_enabled".into(),
        json!(form.checked("model_limits_enabled")),
    );
    let mut models: Vec<String> = form.all("model").into_iter().map(str::to_owned).collect();
    for extra in items(form.get("model_extra")) {
        if !models.contains(&extra) {
            models.push(extra);
        }
    }
    fields.insert("model_limits".into(), json!(models));
    // Feature names, or group names (`images`, `audio`).
    let features = form.all("feature");
    let mut set = FeatureSet::empty();
    for feature in &features {
        if set.insert_name(feature).is_err() {
            return Err(format!("`{feature}` is not a feature."));
        }
    }
    fields.insert("blocked_features".into(), json!(features));
    for name in [
        "blocked_models",
        "blocked_image_sizes",
        "blocked_image_qualities",
        "allow_ips",
    ] {
        fields.insert(name.into(), json!(items(form.get(name))));
    }
    let expires = match form.get("expires_at") {
        None => Value::Null,
        Some(text) => {
            // `datetime-local` gives `2027-01-01T00:00` (or with seconds), read as UTC.
            let full = match text.len() {
                16 => format!("{text}:00Z"),
                19 => format!("{text}Z"),
                _ => text.to_owned(),
            };
            humantime::parse_rfc3339_weak(&full)
                .map_err(|_| "`expires_at` must be a date and time (UTC).".to_owned())?;
            json!(full)
        }
    };
    fields.insert("expires_at".into(), expires);
    fields.insert("disabled".into(), json!(form.checked("disabled")));
    let cap = match form.get("credit_limit_usd") {
        None => Value::Null,
        Some(text) => match text.parse::<f64>() {
            Ok(cap) if cap.is_finite() && cap >= 0.0 => json!(cap),
            _ => {
                return Err("`credit_limit_usd` must be a number of dollars, zero or more.".into())
            }
        },
    };
    fields.insert("credit_limit_usd".into(), cap);
    let period = match form.get("budget_period").unwrap_or("none") {
        p @ ("none" | "daily" | "monthly") => p,
        _ => return Err("`budget_period` is none, daily or monthly.".into()),
    };
    fields.insert("budget_period".into(), json!(period));
    fields.insert("require_user".into(), json!(form.checked("require_user")));
    fields.insert(
        "team".into(),
        form.get("team").map_or(Value::Null, |t| json!(t)),
    );
    let guards = form.all("guard");
    if let Some(unknown) = console.admin.unknown_guard(guards.iter().copied()) {
        return Err(format!(
            "`guards`: `{unknown}` is not a `[[guards]]` name of this proxy."
        ));
    }
    fields.insert("guards".into(), json!(guards));
    let mut labels = Map::new();
    for line in form.get("metadata").unwrap_or_default().lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((label, value)) = line.split_once('=') else {
            return Err(format!(
                "`metadata`: write one label a line, as name=value (not `{line}`)."
            ));
        };
        labels.insert(label.trim().to_owned(), json!(value.trim()));
    }
    fields.insert("metadata".into(), Value::Object(labels));
    Ok(fields)
}

fn checked(on: bool) -> &'static str {
    if on {
        " checked"
    } else {
        ""
    }
}

fn text_of(value: &Value, field: &str) -> String {
    match value.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn list_of(value: &Value, field: &str) -> Vec<String> {
    value
        .get(field)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The form of every policy field: a new key's (`record` none) or `key`'s.
async fn key_form(
    console: &Console,
    session: &Session,
    record: Option<&KeyRecord>,
    key: &ApiKey,
) -> String {
    let value = serde_json::to_value(key).unwrap_or(Value::Null);
    let action = match record {
        Some(record) => key_url(&record.key.name),
        None => "/console/keys".to_owned(),
    };
    let mut out = format!(
        "<form method=\"post\" action=\"{}\" class=\"key-form\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&action),
        esc(&session.csrf)
    );
    if record.is_none() {
        out.push_str(
            "<div class=\"field\"><label for=\"name\">Name</label>\
             <input id=\"name\" name=\"name\" required maxlength=\"200\" autocomplete=\"off\">\
             <p class=\"hint\">The key's id in the audit log; it cannot change later.</p></div>",
        );
    }

    // Models: the upstream's list (narrowed by the workspace), type to filter.
    let selected = key.model_limits.entries();
    let choices = console.models.choices().await;
    let _ = write!(
        out,
        "<fieldset><legend>Models</legend>\
         <label class=\"toggle\"><input type=\"checkbox\" role=\"switch\" name=\"model_limits_enabled\" value=\"1\"{}> \
         Only the models selected below (off: every model the workspace allows)</label>\
         <label for=\"model-filter\">Filter models</label>\
         <input id=\"model-filter\" type=\"search\" data-filter=\"model-choices\" placeholder=\"Type to filter\" autocomplete=\"off\">",
        checked(key.model_limits_enabled)
    );
    let mut listed: Vec<String> = match &choices {
        Ok(models) => models.clone(),
        Err(e) => {
            let _ = write!(
                out,
                "<p class=\"notice error\">The upstream's model list is unavailable ({}): type model names below.</p>",
                esc(e)
            );
            Vec::new()
        }
    };
    for model in selected {
        if !model.ends_with('*') && !listed.contains(model) {
            listed.push(model.clone());
        }
    }
    out.push_str("<ul id=\"model-choices\" class=\"choices\">");
    for (i, model) in listed.iter().enumerate() {
        let _ = write!(
            out,
            "<li data-name=\"{name}\"><input type=\"checkbox\" id=\"model-{i}\" name=\"model\" value=\"{name}\"{}>\
             <label for=\"model-{i}\">{name}</label></li>",
            checked(selected.contains(model)),
            name = esc(model),
        );
    }
    out.push_str("</ul>");
    let wildcards: Vec<&str> = selected
        .iter()
        .filter(|m| m.ends_with('*'))
        .map(String::as_str)
        .collect();
    let _ = write!(
        out,
        "<label for=\"model_extra\">Other models or wildcards (<code>gpt-4o*</code>), comma-separated</label>\
         <input id=\"model_extra\" name=\"model_extra\" value=\"{}\" autocomplete=\"off\">\
         <label for=\"blocked_models\">Blocked models, whatever else allows them</label>\
         <input id=\"blocked_models\" name=\"blocked_models\" value=\"{}\" autocomplete=\"off\"></fieldset>",
        esc(&wildcards.join(", ")),
        esc(&list_of(&value, "blocked_models").join(", "))
    );

    // Features: toggles, on = blocked.
    out.push_str("<fieldset><legend>Blocked features</legend><ul class=\"toggles\">");
    for feature in Feature::ALL {
        let name = feature.as_str();
        let _ = write!(
            out,
            "<li><label class=\"toggle\"><input type=\"checkbox\" role=\"switch\" name=\"feature\" value=\"{name}\"{}> {name}</label></li>",
            checked(key.blocked_features.contains(feature))
        );
    }
    let _ = write!(
        out,
        "</ul><div class=\"grid\">{}{}</div></fieldset>",
        text_field(
            "blocked_image_sizes",
            "Blocked image sizes",
            &list_of(&value, "blocked_image_sizes").join(", "),
            "1792x1024, 1024x1792"
        ),
        text_field(
            "blocked_image_qualities",
            "Blocked image qualities",
            &list_of(&value, "blocked_image_qualities").join(", "),
            "hd, high"
        ),
    );

    // Limits.
    out.push_str("<fieldset><legend>Prompt and output limits</legend><div class=\"grid\">");
    for (name, label) in [
        ("max_prompt_tokens", "Prompt tokens at most"),
        ("max_prompt_chars", "Prompt characters at most"),
        ("max_output_tokens", "Output tokens at most"),
        ("max_n", "Choices (n) at most"),
        ("max_messages", "Chat messages at most"),
    ] {
        out.push_str(&number_field(name, label, &text_of(&value, name), "1"));
    }
    let _ = write!(
        out,
        "</div><label class=\"toggle\"><input type=\"checkbox\" role=\"switch\" name=\"require_user\" value=\"1\"{}> Every request must name its end user (<code>user</code>)</label></fieldset>",
        checked(key.require_user)
    );

    // Access.
    let expires = text_of(&value, "expires_at");
    let expires = expires.get(..19).unwrap_or_default();
    let _ = write!(
        out,
        "<fieldset><legend>Access</legend>\
         <label for=\"allow_ips\">Client addresses allowed (CIDR blocks or addresses, one a line; empty: any)</label>\
         <textarea id=\"allow_ips\" name=\"allow_ips\" rows=\"3\" spellcheck=\"false\">{}</textarea>\
         <div class=\"grid\"><div class=\"field\"><label for=\"expires_at\">Expires (UTC)</label>\
         <input id=\"expires_at\" name=\"expires_at\" type=\"datetime-local\" step=\"1\" value=\"{}\"></div></div>\
         <label class=\"toggle\"><input type=\"checkbox\" role=\"switch\" name=\"disabled\" value=\"1\"{}> Disabled</label></fieldset>",
        esc(&list_of(&value, "allow_ips").join("\n")),
        esc(expires),
        checked(key.disabled)
    );

    // Spend and rates.
    let period = text_of(&value, "budget_period");
    let period = if period.is_empty() { "none" } else { &period };
    let mut options = String::new();
    for (v, label) in [
        ("none", "The key's whole life"),
        ("daily", "Per day (UTC)"),
        ("monthly", "Per month (UTC)"),
    ] {
        let sel = if v == period { " selected" } else { "" };
        let _ = write!(options, "<option value=\"{v}\"{sel}>{label}</option>");
    }
    let _ = write!(
        out,
        "<fieldset><legend>Spend and rates</legend><div class=\"grid\">{}\
         <div class=\"field\"><label for=\"budget_period\">Cap period</label><select id=\"budget_period\" name=\"budget_period\">{options}</select></div>\
         {}{}{}</div></fieldset>",
        number_field(
            "credit_limit_usd",
            "Spend cap (USD)",
            &text_of(&value, "credit_limit_usd"),
            "any"
        ),
        number_field("rpm", "Requests per minute", &text_of(&value, "rpm"), "1"),
        number_field("tpm", "Tokens per minute", &text_of(&value, "tpm"), "1"),
        text_field("team", "Team", &text_of(&value, "team"), ""),
    );

    // Guards.
    out.push_str("<fieldset><legend>Guard policies</legend>");
    match console.admin.guard_names() {
        Some(names) if !names.is_empty() => {
            out.push_str("<ul class=\"toggles\">");
            for name in names {
                let _ = write!(
                    out,
                    "<li><label class=\"toggle\"><input type=\"checkbox\" role=\"switch\" name=\"guard\" value=\"{n}\"{}> {n}</label></li>",
                    checked(key.guards.contains(&name)),
                    n = esc(&name)
                );
            }
            out.push_str("</ul>");
        }
        _ => out.push_str("<p class=\"hint\">No <code>[[guards]]</code> are configured.</p>"),
    }
    out.push_str("</fieldset>");

    let labels: String = key
        .metadata
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    let _ = write!(
        out,
        "<fieldset><legend>Labels</legend><label for=\"metadata\">Labels copied into the audit records, one a line: name=value</label>\
         <textarea id=\"metadata\" name=\"metadata\" rows=\"3\" spellcheck=\"false\">{}</textarea></fieldset>\
         <p class=\"actions\"><button type=\"submit\">{}</button></p></form>",
        esc(&labels),
        if record.is_some() { "Save" } else { "Create key" }
    );
    out
}

fn number_field(name: &str, label: &str, value: &str, step: &str) -> String {
    format!(
        "<div class=\"field\"><label for=\"{name}\">{label}</label>\
         <input id=\"{name}\" name=\"{name}\" type=\"number\" min=\"0\" step=\"{step}\" value=\"{}\" inputmode=\"decimal\"></div>",
        esc(value)
    )
}

fn text_field(name: &str, label: &str, value: &str, placeholder: &str) -> String {
    format!(
        "<div class=\"field\"><label for=\"{name}\">{label}</label>\
         <input id=\"{name}\" name=\"{name}\" value=\"{}\" placeholder=\"{}\" autocomplete=\"off\"></div>",
        esc(value),
        esc(placeholder)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_fields_split_on_commas_and_lines() {
        assert_eq!(items(Some("a, b\nc,,\n")), ["a", "b", "c"]);
        assert!(items(None).is_empty());
        assert_eq!(
            short_time("2026-12-03T10:11:12.123Z"),
            "2026-12-03 10:11:12 UTC"
        );
    }
}
