//! The console at `/console`: server-rendered pages over the operator API's data (agents,
//! deliveries with their attempts and a replay button, runs with their steps, one call's
//! timeline), for an operator in a browser.
//!
//! Behind the admin key: a login form sets `midcall_console`, an HTTP-only, `SameSite=Strict`
//! session cookie (`Secure` behind an HTTPS proxy; plain HTTP answers loopback peers only).
//! Every button that changes something posts a CSRF token tied to the session; without it the
//! answer is 403. Pages never show a secret: URLs and headers are shown as written, so a
//! `{{secrets.NAME}}` shows its name. The only script is `/console/app.js`, which shows times
//! in the browser's local time.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Mutex;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::Value;

use crate::automation::Automations;
use crate::server::admin::{self, Admin, ApiError};
use crate::store::Db;
use crate::time;

/// The session cookie's name.
pub const COOKIE: &str = "midcall_console";
/// How long a console session lasts: 12 hours.
pub const SESSION_S: i64 = 12 * 3600;
/// Logged-out sessions remembered until they expire: at most 10 000.
const MAX_REVOKED: usize = 10_000;
const MAX_FORM_BYTES: usize = 4096;

/// Console sessions: a token is `expiry.nonce.mac`, signed with a key derived from the admin
/// key, so every process of a fleet with that key accepts it. Logging out revokes it in the
/// process that served the logout (and clears the browser's cookie).
#[derive(Default)]
pub(crate) struct Sessions {
    revoked: Mutex<HashMap<String, i64>>,
}

impl Sessions {
    pub(crate) fn create(&self, a: &Admin) -> String {
        let mut raw = [0u8; 16];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw);
        let nonce: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let exp = time::now_ms() / 1000 + SESSION_S;
        let body = format!("{exp}.{nonce}");
        let mac = a.sign(&format!("session:{body}"));
        format!("{body}.{mac}")
    }

    pub(crate) fn valid(&self, a: &Admin, token: &str) -> bool {
        let mut parts = token.splitn(3, '.');
        let (Some(exp), Some(nonce), Some(mac)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let Ok(exp_s) = exp.parse::<i64>() else {
            return false;
        };
        exp_s > time::now_ms() / 1000
            && a.verify(&format!("session:{exp}.{nonce}"), mac)
            && !self
                .revoked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(token)
    }

    fn end(&self, token: &str) {
        let now = time::now_ms() / 1000;
        let mut m = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, exp| *exp > now);
        if m.len() < MAX_REVOKED {
            m.insert(token.to_string(), now + SESSION_S);
        }
    }
}

fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    h.insert(
        "content-security-policy",
        http::HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert("x-frame-options", http::HeaderValue::from_static("DENY"));
    h.insert(
        "referrer-policy",
        http::HeaderValue::from_static("no-referrer"),
    );
    r
}

fn redirect(to: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = http::HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Escapes text for HTML content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
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

/// A path segment or query value, percent-encoded.
fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn cookie_token(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

const STYLE: &str = r#"
:root{--bg:#f6f7f9;--fg:#1d2330;--muted:#5d6677;--line:#dde1e8;--card:#fff;--ok:#17803d;--okbg:#e3f5e9;--bad:#b42318;--badbg:#fde7e5;--warn:#9a6700;--warnbg:#fff4d6;--info:#1d5fb4;--infobg:#e5efff;--accent:#2f4ea8}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;background:var(--bg);color:var(--fg)}
header{background:#1d2330;color:#fff;padding:.6rem 1rem;display:flex;flex-wrap:wrap;gap:.4rem 1.2rem;align-items:center}
header .brand{font-weight:700;letter-spacing:.02em}
header nav{display:flex;flex-wrap:wrap;gap:.2rem .9rem;flex:1}
header a{color:#cfd8ff;text-decoration:none}
header a.on{color:#fff;font-weight:600;border-bottom:2px solid #8fa8ff}
header form{margin:0}
header button{background:transparent;color:#cfd8ff;border:1px solid #4a5470;border-radius:4px;padding:.15rem .6rem;cursor:pointer}
main{padding:1rem;max-width:1200px;margin:0 auto}
h1{font-size:1.35rem;margin:.2rem 0 .8rem}
h2{font-size:1.1rem;margin:1.4rem 0 .5rem}
h3{font-size:1rem;margin:1rem 0 .4rem;color:var(--muted)}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.8rem 1rem;margin:.8rem 0}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;background:var(--card);border:1px solid var(--line);border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
th{background:#eef1f5;font-weight:600;white-space:nowrap}
tr:last-child td{border-bottom:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font:12.5px/1.4 ui-monospace,"DejaVu Sans Mono",monospace}
pre{white-space:pre-wrap;word-break:break-all;margin:0;max-height:12rem;overflow:auto;background:#f3f4f7;padding:.3rem .4rem;border-radius:4px}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:999px;font-size:.8rem;font-weight:600;white-space:nowrap}
.s-delivered,.s-succeeded,.s-ok,.s-enabled{background:var(--okbg);color:var(--ok)}
.s-failed,.s-disabled{background:var(--badbg);color:var(--bad)}
.s-pending,.s-queued,.s-running{background:var(--warnbg);color:var(--warn)}
.s-skipped{background:#eceef2;color:var(--muted)}
.muted{color:var(--muted)}
.error{background:var(--badbg);color:var(--bad);border:1px solid #f5c2bd;padding:.5rem .8rem;border-radius:6px;margin:.6rem 0}
.note{background:var(--infobg);color:var(--info);padding:.5rem .8rem;border-radius:6px;margin:.6rem 0}
form.filters{display:flex;flex-wrap:wrap;gap:.5rem;align-items:flex-end;margin:.4rem 0 .8rem}
form.filters label{display:flex;flex-direction:column;font-size:.8rem;color:var(--muted);gap:.15rem}
input,select{font:inherit;padding:.3rem .4rem;border:1px solid #c5cbd6;border-radius:4px;background:#fff;max-width:100%}
button.primary,form.filters button{background:var(--accent);color:#fff;border:0;border-radius:5px;padding:.4rem .9rem;font:inherit;cursor:pointer}
button.danger{background:#fff;color:var(--bad);border:1px solid #f0b3ad;border-radius:5px;padding:.25rem .7rem;cursor:pointer}
button.plain{background:#fff;color:var(--accent);border:1px solid #c5cbd6;border-radius:5px;padding:.25rem .7rem;cursor:pointer}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.25rem .9rem;margin:0}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0;word-break:break-all}
ol.timeline{list-style:none;padding:0;margin:0;border-left:3px solid var(--line)}
ol.timeline li{margin:0 0 .8rem;padding:.1rem 0 .1rem .9rem;position:relative}
ol.timeline li::before{content:"";position:absolute;left:-8px;top:.45rem;width:13px;height:13px;border-radius:50%;background:var(--accent);border:2px solid #fff}
.login{max-width:360px;margin:12vh auto;background:var(--card);border:1px solid var(--line);border-radius:10px;padding:1.4rem}
.login input{width:100%;margin:.4rem 0 .8rem}
.pager{margin:.8rem 0}
@media (max-width:600px){main{padding:.6rem}th,td{padding:.35rem .45rem}header{padding:.5rem .6rem}}
"#;

const SCRIPT: &str = r#"// Shows every <time data-ms> in the browser's local time.
document.querySelectorAll('time[data-ms]').forEach(function (t) {
  var d = new Date(Number(t.getAttribute('data-ms')));
  if (!isNaN(d)) { t.textContent = d.toLocaleString(); t.title = d.toISOString(); }
});
"#;

fn page(title: &str, nav: &str, csrf: Option<&str>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 6000);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{} · midcall</title><style>{STYLE}</style></head><body>",
        esc(title)
    );
    if let Some(csrf) = csrf {
        let link = |href: &str, name: &str, key: &str| {
            format!(
                "<a href=\"{href}\"{}>{name}</a>",
                if key == nav { " class=\"on\"" } else { "" }
            )
        };
        let _ = write!(
            out,
            "<header><span class=\"brand\">midcall</span><nav>{}{}{}</nav><form id=\"logout\" method=\"post\" action=\"/console/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Log out</button></form></header>",
            link("/console/agents", "Agents", "agents"),
            link("/console/deliveries", "Deliveries", "deliveries"),
            link("/console/runs", "Runs", "runs"),
            esc(csrf)
        );
    }
    out.push_str("<main>");
    out.push_str(body);
    out.push_str("</main><script src=\"/console/app.js\"></script></body></html>");
    out
}

fn when(ms: i64) -> String {
    let iso = time::rfc3339_ms(ms);
    format!(
        "<time data-ms=\"{ms}\" datetime=\"{iso}\">{}</time>",
        esc(&iso)
    )
}

fn badge(status: &str) -> String {
    format!(
        "<span class=\"badge s-{}\">{}</span>",
        esc(status),
        esc(status)
    )
}

fn login_page(message: Option<&str>) -> String {
    let err = message
        .map(|m| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(m)))
        .unwrap_or_default();
    page(
        "Log in",
        "",
        None,
        &format!(
            "<div class=\"login\"><h1>midcall console</h1>{err}<form id=\"login-form\" method=\"post\" action=\"/console/login\"><label for=\"secret\">Admin key</label><input id=\"secret\" name=\"secret\" type=\"password\" autocomplete=\"current-password\" required autofocus><button id=\"login\" class=\"primary\" type=\"submit\">Log in</button></form><p class=\"muted\">The key is the server's admin secret (MIDCALL_SECRET_ADMIN_KEY unless --admin-secret names another).</p></div>"
        ),
    )
}

/// The form fields of a urlencoded body (at most 4 KiB).
async fn form(req: Request<Incoming>) -> Result<HashMap<String, String>, Response<Full<Bytes>>> {
    let body = match Limited::new(req.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(html(
                StatusCode::PAYLOAD_TOO_LARGE,
                page(
                    "Too large",
                    "",
                    None,
                    "<p class=\"error\">The form is too large.</p>",
                ),
            ))
        }
    };
    Ok(admin::urlencoded(&String::from_utf8_lossy(&body)).collect())
}

/// `/console...`.
pub(crate) async fn handle(
    a: &Admin,
    automations: &Automations,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/console/app.js" {
        let mut r = Response::new(Full::new(Bytes::from_static(SCRIPT.as_bytes())));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/javascript; charset=utf-8"),
        );
        return r;
    }
    let Some(db) = a.db.as_ref() else {
        return html(
            StatusCode::NOT_FOUND,
            page(
                "Console off",
                "",
                None,
                "<p class=\"error\">The console is off: start the server with an admin key (--admin-secret).</p>",
            ),
        );
    };
    if let Some(why) = a.transport_refusal(peer) {
        return html(
            StatusCode::FORBIDDEN,
            page(
                "Refused",
                "",
                None,
                &format!("<p class=\"error\">{}</p>", esc(why)),
            ),
        );
    }
    let method = req.method().clone();
    if path == "/console/login" {
        return match method {
            Method::POST => login(a, peer, req).await,
            _ => html(StatusCode::OK, login_page(None)),
        };
    }
    let token = cookie_token(&req).filter(|t| a.sessions.valid(a, t));
    let Some(token) = token else {
        if method == Method::GET {
            return redirect("/console/login");
        }
        return html(
            StatusCode::FORBIDDEN,
            page("Refused", "", None, "<p class=\"error\">Log in first.</p>"),
        );
    };
    if let Some(wait) = a.limited("console") {
        return admin::too_many(wait);
    }
    let csrf = a.sign(&format!("csrf:{token}"));
    let query = req.uri().query().unwrap_or_default().to_string();
    let segments = admin::segments(&path, "/console");
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    if method == Method::POST {
        let fields = match form(req).await {
            Ok(f) => f,
            Err(r) => return r,
        };
        let ok = fields
            .get("csrf")
            .is_some_and(|t| a.verify(&format!("csrf:{token}"), t));
        if !ok {
            tracing::warn!(target: "midcall::admin", path = %path.chars().take(200).collect::<String>(), "console: a change without a valid CSRF token was refused");
            return html(
                StatusCode::FORBIDDEN,
                page(
                    "Refused",
                    "",
                    Some(&csrf),
                    "<p class=\"error\">Refused: the form's CSRF token is missing or wrong. Reload the page and try again.</p>",
                ),
            );
        }
        return match segs.as_slice() {
            ["logout"] => {
                a.sessions.end(&token);
                let mut r = redirect("/console/login");
                if let Ok(v) = http::HeaderValue::from_str(&format!(
                    "{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{}",
                    if a.https { "; Secure" } else { "" }
                )) {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                }
                r
            }
            ["deliveries", id, "replay"] => match admin::replay(automations, db, id).await {
                Ok(_) => redirect(&format!("/console/deliveries/{}?replayed=1", enc(id))),
                Err(e) => error_page(&csrf, e),
            },
            ["endpoints", ep, act @ ("disable" | "enable")] => {
                match admin::set_disabled(automations, db, ep, *act == "disable").await {
                    Ok(_) => redirect("/console/agents"),
                    Err(e) => error_page(&csrf, e),
                }
            }
            ["endpoints", ep, "recover"] => {
                let since = fields.get("since").cloned().unwrap_or_default();
                let q = format!("since={}", enc(&since));
                match admin::recover(automations, db, ep, &q).await {
                    Ok(_) => redirect(&format!("/console/deliveries?endpoint={}", enc(ep))),
                    Err(e) => error_page(&csrf, e),
                }
            }
            _ => error_page(
                &csrf,
                ApiError(StatusCode::NOT_FOUND, "no such console action".into()),
            ),
        };
    }
    let result = match segs.as_slice() {
        [] => return redirect("/console/agents"),
        ["agents"] => agents_page(automations, db, &csrf).await,
        ["deliveries"] => deliveries_page(automations, db, &csrf, &query).await,
        ["deliveries", id] => delivery_page(automations, db, &csrf, id, &query).await,
        ["runs"] => runs_page(automations, db, &csrf, &query).await,
        ["runs", id] => run_page(automations, db, &csrf, id).await,
        ["calls", id] => call_page(db, &csrf, id).await,
        _ => Err(ApiError(StatusCode::NOT_FOUND, "no such page".into())),
    };
    match result {
        Ok(body) => html(StatusCode::OK, body),
        Err(e) => error_page(&csrf, e),
    }
}

fn error_page(csrf: &str, ApiError(status, message): ApiError) -> Response<Full<Bytes>> {
    html(
        status,
        page(
            "Error",
            "",
            Some(csrf),
            &format!(
                "<h1>{}</h1><p class=\"error\">{}</p>",
                status.as_u16(),
                esc(&message)
            ),
        ),
    )
}

async fn login(a: &Admin, peer: IpAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let fields = match form(req).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let presented = fields.get("secret").map(|s| s.trim()).unwrap_or_default();
    if presented.is_empty() || !a.is_key(presented) {
        if let Some(wait) = a.failed(peer) {
            return admin::too_many(wait);
        }
        tracing::warn!(target: "midcall::admin", %peer, "console: a login with a wrong key was refused");
        return html(
            StatusCode::UNAUTHORIZED,
            login_page(Some("Wrong admin key.")),
        );
    }
    let token = a.sessions.create(a);
    let mut r = redirect("/console/agents");
    if let Ok(v) = http::HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={SESSION_S}{}",
        if a.https { "; Secure" } else { "" }
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    tracing::info!(target: "midcall::admin", %peer, "console: logged in");
    r
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or_default()
}

async fn agents_page(automations: &Automations, db: &Db, csrf: &str) -> Result<String, ApiError> {
    let data = admin::agents_json(automations);
    let states = admin::endpoint_states(db).await?;
    let agents = data["agents"].as_array().cloned().unwrap_or_default();
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Agents</h1><div class=\"scroll\"><table id=\"agents\"><thead><tr><th>Agent</th><th>Tenant</th><th class=\"num\">Actions</th><th class=\"num\">Webhooks</th><th class=\"num\">Automations</th></tr></thead><tbody>"
    );
    for ag in &agents {
        let id = s(ag, "id");
        let _ = write!(
            b,
            "<tr class=\"agent\"><td><a href=\"#agent-{}\">{}</a></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(id),
            esc(id),
            esc(s(ag, "tenant")),
            ag["actions"].as_array().map_or(0, Vec::len),
            ag["webhooks"].as_array().map_or(0, Vec::len),
            ag["automations"].as_array().map_or(0, Vec::len),
        );
    }
    b.push_str("</tbody></table></div>");
    for ag in &agents {
        let id = s(ag, "id");
        let _ = write!(
            b,
            "<section class=\"card\" id=\"agent-{}\"><h2>{} <span class=\"muted\">· tenant {}</span></h2>",
            esc(id),
            esc(id),
            esc(s(ag, "tenant"))
        );
        b.push_str("<h3>Actions</h3><div class=\"scroll\"><table class=\"actions\"><thead><tr><th>Name</th><th>Method</th><th>URL</th><th>Description</th></tr></thead><tbody>");
        for x in ag["actions"].as_array().into_iter().flatten() {
            let _ = write!(
                b,
                "<tr><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                esc(s(x, "name")),
                esc(s(x, "method")),
                esc(s(x, "url")),
                esc(s(x, "description"))
            );
        }
        if ag["actions"].as_array().is_none_or(Vec::is_empty) {
            b.push_str("<tr><td colspan=\"4\" class=\"muted\">None.</td></tr>");
        }
        b.push_str("</tbody></table></div><h3>Webhooks</h3><div class=\"scroll\"><table class=\"webhooks\"><thead><tr><th>Label</th><th>Method</th><th>URL</th><th>Subscriptions</th><th>State</th><th>Throttle</th><th>Public key (v1a)</th><th></th></tr></thead><tbody>");
        for w in ag["webhooks"].as_array().into_iter().flatten() {
            let ep = s(w, "endpoint");
            let st = states.iter().find(|x| x.endpoint == ep);
            let disabled = st.is_some_and(|x| x.disabled) || w["enabled"] == Value::Bool(false);
            let subs: Vec<&str> = w["subscriptions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let (act, label) = if disabled {
                ("enable", "Enable")
            } else {
                ("disable", "Disable")
            };
            let _ = write!(
                b,
                "<tr class=\"webhook\" data-endpoint=\"{}\"><td>{}</td><td>POST</td><td><code>{}</code></td><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td><td><a href=\"/console/deliveries?endpoint={}\">Deliveries</a> <form method=\"post\" action=\"/console/endpoints/{}/{act}\" style=\"display:inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\" class=\"{}\">{label}</button></form></td></tr>",
                esc(ep),
                esc(w["label"].as_str().unwrap_or(ep)),
                esc(s(w, "url")),
                esc(&subs.join(", ")),
                badge(if disabled { "disabled" } else { "enabled" }),
                st.and_then(|x| x.disabled_reason.as_deref())
                    .map(|r| format!(" <span class=\"muted\">{}</span>", esc(r)))
                    .unwrap_or_default(),
                w["max_per_second"]
                    .as_f64()
                    .map(|r| format!("{r}/s"))
                    .unwrap_or_else(|| "—".into()),
                w["public_key"]
                    .as_str()
                    .map(|k| format!("<code>{}</code>", esc(k)))
                    .unwrap_or_else(|| "—".into()),
                enc(ep),
                enc(ep),
                esc(csrf),
                if disabled { "plain" } else { "danger" },
            );
        }
        if ag["webhooks"].as_array().is_none_or(Vec::is_empty) {
            b.push_str("<tr><td colspan=\"8\" class=\"muted\">None.</td></tr>");
        }
        b.push_str("</tbody></table></div><h3>Automations</h3><div class=\"scroll\"><table class=\"automations\"><thead><tr><th>Id</th><th>Trigger</th><th>Steps</th><th>Route</th><th></th></tr></thead><tbody>");
        for x in ag["automations"].as_array().into_iter().flatten() {
            let steps: Vec<String> = x["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|st| match (st.get("send_webhook"), st.get("run_action")) {
                    (Some(u), _) => format!(
                        "send_webhook <code>{}</code>",
                        esc(u.as_str().unwrap_or_default())
                    ),
                    (_, Some(a)) => format!(
                        "run_action <code>{}</code>",
                        esc(a.as_str().unwrap_or_default())
                    ),
                    _ => String::new(),
                })
                .collect();
            let _ = write!(
                b,
                "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/console/runs?automation={}\">Runs</a></td></tr>",
                esc(s(x, "id")),
                if x["enabled"] == Value::Bool(false) { " <span class=\"badge s-disabled\">disabled</span>" } else { "" },
                esc(s(x, "trigger")),
                steps.join("<br>"),
                x["route"].as_str().map(|r| format!("<code>POST {}</code>", esc(r))).unwrap_or_else(|| "—".into()),
                enc(s(x, "stored_as")),
            );
        }
        if ag["automations"].as_array().is_none_or(Vec::is_empty) {
            b.push_str("<tr><td colspan=\"5\" class=\"muted\">None.</td></tr>");
        }
        b.push_str("</tbody></table></div></section>");
    }
    Ok(page("Agents", "agents", Some(csrf), &b))
}

fn select(name: &str, label: &str, options: &[String], current: Option<&str>) -> String {
    let mut out = format!("<label>{label}<select name=\"{name}\"><option value=\"\">any</option>");
    for o in options {
        let _ = write!(
            out,
            "<option{}>{}</option>",
            if Some(o.as_str()) == current {
                " selected"
            } else {
                ""
            },
            esc(o)
        );
    }
    out.push_str("</select></label>");
    out
}

fn text_input(name: &str, label: &str, current: Option<&str>) -> String {
    format!(
        "<label>{label}<input name=\"{name}\" value=\"{}\" size=\"14\"></label>",
        esc(current.unwrap_or_default())
    )
}

fn param<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

/// A list page's title and filter form: agent and status menus, then `texts` (name, label).
fn filters(
    title: &str,
    action: &str,
    automations: &Automations,
    pairs: &[(String, String)],
    statuses: &[&str],
    texts: &[(&str, &str)],
) -> String {
    let ids: Vec<String> = automations
        .agents()
        .ids()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
    let mut b = format!(
        "<h1>{}</h1><form class=\"filters\" method=\"get\" action=\"{action}\">",
        esc(title)
    );
    b.push_str(&select("agent", "Agent", &ids, param(pairs, "agent")));
    b.push_str(&select(
        "status",
        "Status",
        &statuses,
        param(pairs, "status"),
    ));
    for (name, label) in texts {
        b.push_str(&text_input(name, label, param(pairs, name)));
    }
    b.push_str("<button type=\"submit\">Filter</button></form>");
    b
}

/// The "Older →" link to the next page, when there is one.
fn pager(path: &str, pairs: &[(String, String)], next: Option<&str>) -> String {
    let Some(c) = next else {
        return String::new();
    };
    let q = without_cursor(pairs);
    format!(
        "<p class=\"pager\"><a href=\"{path}?{}{}cursor={}\">Older →</a></p>",
        esc(&q),
        if q.is_empty() { "" } else { "&amp;" },
        enc(c)
    )
}

/// The query without `cursor`, to build the next page's link.
fn without_cursor(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .filter(|(k, _)| k != "cursor" && k != "replayed")
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn deliveries_page(
    automations: &Automations,
    db: &Db,
    csrf: &str,
    query: &str,
) -> Result<String, ApiError> {
    let filter = admin::delivery_filter(automations, query)?;
    let pairs = admin::query_pairs(query, admin::DELIVERY_PARAMS)?;
    let (rows, next) = admin::find_deliveries(db, filter).await?;
    let mut b = filters(
        "Deliveries",
        "/console/deliveries",
        automations,
        &pairs,
        admin::STATUSES,
        &[
            ("event", "Event"),
            ("call_id", "Call"),
            ("endpoint", "Endpoint"),
        ],
    );
    b.push_str("<div class=\"scroll\"><table id=\"deliveries\"><thead><tr><th>#</th><th>Created</th><th>Status</th><th>Endpoint</th><th>Event</th><th>Call</th><th class=\"num\">Attempts</th><th>Last answer</th></tr></thead><tbody>");
    for (d, attempts) in &rows {
        let last = attempts
            .last()
            .map(|a| match (a.status_code, &a.error) {
                (Some(c), _) => format!("HTTP {c} · {} ms", a.duration_ms),
                (None, Some(e)) => esc(&e.chars().take(80).collect::<String>()),
                _ => String::new(),
            })
            .unwrap_or_else(|| "—".into());
        let _ = write!(
            b,
            "<tr class=\"delivery\" data-id=\"{}\" data-status=\"{}\"><td><a class=\"delivery-link\" href=\"/console/deliveries/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td><a href=\"/console/calls/{}\"><code>{}</code></a></td><td class=\"num\">{}</td><td>{}</td></tr>",
            d.id,
            esc(&d.status),
            d.id,
            d.id,
            when(d.created_ms),
            badge(&d.status),
            esc(&d.endpoint),
            esc(&d.event_type),
            enc(&d.call_id),
            esc(&d.call_id),
            d.attempts,
            last
        );
    }
    if rows.is_empty() {
        b.push_str("<tr><td colspan=\"8\" class=\"muted\">No deliveries match.</td></tr>");
    }
    b.push_str("</tbody></table></div>");
    b.push_str(&pager("/console/deliveries", &pairs, next.as_deref()));
    Ok(page("Deliveries", "deliveries", Some(csrf), &b))
}

async fn delivery_page(
    automations: &Automations,
    db: &Db,
    csrf: &str,
    id: &str,
    query: &str,
) -> Result<String, ApiError> {
    let (d, attempts) = admin::delivery_with_attempts(db, id).await?;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Delivery {} <span id=\"status\" class=\"badge s-{}\">{}</span></h1>",
        d.id,
        esc(&d.status),
        esc(&d.status)
    );
    if query.contains("replayed=1") {
        b.push_str("<p class=\"note\">Replay queued: the delivery is sent again now.</p>");
    }
    let _ = write!(
        b,
        "<div class=\"card\"><dl class=\"facts\"><dt>Agent</dt><dd>{}</dd><dt>Endpoint</dt><dd>{}</dd><dt>Event</dt><dd><code>{}</code></dd><dt>Call</dt><dd><a id=\"call-id\" href=\"/console/calls/{}\">{}</a></dd><dt>webhook-id</dt><dd><code>{}</code></dd><dt>Created</dt><dd>{}</dd><dt>Next attempt</dt><dd>{}</dd><dt>Last error</dt><dd>{}</dd></dl>",
        esc(&admin::agent_of(automations, &d.endpoint).unwrap_or_default()),
        esc(&d.endpoint),
        esc(&d.event_type),
        enc(&d.call_id),
        esc(&d.call_id),
        esc(&d.webhook_id),
        when(d.created_ms),
        d.next_attempt_ms.map(when).unwrap_or_else(|| "—".into()),
        esc(d.last_error.as_deref().unwrap_or("—")),
    );
    if d.status != "pending" {
        let _ = write!(
            b,
            "<form id=\"replay\" method=\"post\" action=\"/console/deliveries/{}/replay\" style=\"margin-top:.8rem\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button id=\"replay-button\" class=\"primary\" type=\"submit\">Replay</button></form>",
            d.id,
            esc(csrf)
        );
    }
    b.push_str("</div><h2>Attempts</h2><div class=\"scroll\"><table id=\"attempts\"><thead><tr><th>#</th><th>At</th><th>Answer</th><th class=\"num\">Latency</th><th>Response</th></tr></thead><tbody>");
    for (i, a) in attempts.iter().enumerate() {
        let answer = match (a.status_code, &a.error) {
            (Some(c), _) => format!(
                "<span class=\"badge {}\">{c}</span>",
                if (200..300).contains(&c) {
                    "s-ok"
                } else {
                    "s-failed"
                }
            ),
            (None, Some(e)) => format!("<span class=\"badge s-failed\">{}</span>", esc(e)),
            _ => String::new(),
        };
        let _ = write!(
            b,
            "<tr class=\"attempt\"><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{} ms</td><td><pre>{}</pre></td></tr>",
            i + 1,
            when(a.at_ms),
            answer,
            a.duration_ms,
            esc(&a.response_prefix.chars().take(2048).collect::<String>())
        );
    }
    if attempts.is_empty() {
        b.push_str("<tr><td colspan=\"5\" class=\"muted\">No attempt yet.</td></tr>");
    }
    b.push_str("</tbody></table></div>");
    Ok(page(
        &format!("Delivery {}", d.id),
        "deliveries",
        Some(csrf),
        &b,
    ))
}

async fn runs_page(
    automations: &Automations,
    db: &Db,
    csrf: &str,
    query: &str,
) -> Result<String, ApiError> {
    let filter = admin::run_filter(automations, query)?;
    let pairs = admin::query_pairs(query, admin::RUN_PARAMS)?;
    let (rows, next) = admin::find_runs(db, filter).await?;
    let mut b = filters(
        "Automation runs",
        "/console/runs",
        automations,
        &pairs,
        admin::RUN_STATUSES,
        &[("automation", "Automation"), ("call_id", "Call")],
    );
    b.push_str("<div class=\"scroll\"><table id=\"runs\"><thead><tr><th>Run</th><th>Created</th><th>Status</th><th>Automation</th><th>Trigger</th><th class=\"num\">Steps</th><th>Error</th></tr></thead><tbody>");
    for r in &rows {
        let _ = write!(
            b,
            "<tr class=\"run\" data-status=\"{}\"><td><a class=\"run-link\" href=\"/console/runs/{}\"><code>{}</code></a></td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&r.status),
            enc(&r.id),
            esc(&r.id),
            when(r.created_ms),
            badge(&r.status),
            esc(&r.automation),
            esc(&r.trigger),
            r.steps.len(),
            esc(r.error.as_deref().unwrap_or(""))
        );
    }
    if rows.is_empty() {
        b.push_str("<tr><td colspan=\"7\" class=\"muted\">No runs match.</td></tr>");
    }
    b.push_str("</tbody></table></div>");
    b.push_str(&pager("/console/runs", &pairs, next.as_deref()));
    Ok(page("Runs", "runs", Some(csrf), &b))
}

async fn run_page(
    automations: &Automations,
    db: &Db,
    csrf: &str,
    id: &str,
) -> Result<String, ApiError> {
    let r = admin::run_by_id(db, id).await?;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Run <code>{}</code> <span id=\"status\" class=\"badge s-{}\">{}</span></h1><div class=\"card\"><dl class=\"facts\"><dt>Agent</dt><dd>{}</dd><dt>Automation</dt><dd><code>{}</code></dd><dt>Trigger</dt><dd>{}</dd><dt>Call</dt><dd>{}</dd><dt>Created</dt><dd>{}</dd><dt>Finished</dt><dd>{}</dd><dt>Error</dt><dd>{}</dd></dl></div>",
        esc(&r.id),
        esc(&r.status),
        esc(&r.status),
        esc(&admin::agent_of(automations, &r.automation).unwrap_or_default()),
        esc(&r.automation),
        esc(&r.trigger),
        r.call_id
            .as_deref()
            .map(|c| format!("<a href=\"/console/calls/{}\">{}</a>", enc(c), esc(c)))
            .unwrap_or_else(|| format!("<a href=\"/console/calls/{}\">{}</a>", enc(&r.id), esc(&r.id))),
        when(r.created_ms),
        r.finished_ms.map(when).unwrap_or_else(|| "—".into()),
        esc(r.error.as_deref().unwrap_or("—")),
    );
    b.push_str("<h2>Steps</h2><div class=\"scroll\"><table id=\"steps\"><thead><tr><th>#</th><th>Kind</th><th>Status</th><th class=\"num\">Took</th><th>Detail</th></tr></thead><tbody>");
    for st in &r.steps {
        let _ = write!(
            b,
            "<tr class=\"step\"><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{} ms</td><td>{}</td></tr>",
            st.index + 1,
            esc(&st.kind),
            badge(&st.status),
            st.duration_ms,
            esc(&st.detail)
        );
    }
    if r.steps.is_empty() {
        b.push_str("<tr><td colspan=\"5\" class=\"muted\">No step finished yet.</td></tr>");
    }
    b.push_str("</tbody></table></div>");
    let (deliveries, _) = admin::find_deliveries(
        db,
        crate::store::query::DeliveryFilter {
            call_id: Some(r.call_id.clone().unwrap_or_else(|| r.id.clone())),
            limit: 50,
            ..Default::default()
        },
    )
    .await?;
    let own: Vec<_> = deliveries
        .iter()
        .filter(|(d, _)| d.webhook_id.starts_with(&format!("msg_{}_step", r.id)))
        .collect();
    if !own.is_empty() {
        b.push_str("<h2>Its deliveries</h2><ul>");
        for (d, _) in own {
            let _ = write!(
                b,
                "<li><a href=\"/console/deliveries/{}\">Delivery {}</a> {} <code>{}</code></li>",
                d.id,
                d.id,
                badge(&d.status),
                esc(&d.endpoint)
            );
        }
        b.push_str("</ul>");
    }
    Ok(page(&format!("Run {}", r.id), "runs", Some(csrf), &b))
}

async fn call_page(db: &Db, csrf: &str, id: &str) -> Result<String, ApiError> {
    let (deliveries, _) = admin::find_deliveries(
        db,
        crate::store::query::DeliveryFilter {
            call_id: Some(id.to_string()),
            limit: admin::ADMIN_MAX_LIMIT,
            ..Default::default()
        },
    )
    .await?;
    let (runs, _) = admin::find_runs(
        db,
        crate::store::query::RunFilter {
            call_id: Some(id.to_string()),
            limit: admin::ADMIN_MAX_LIMIT,
            ..Default::default()
        },
    )
    .await?;
    // (time, html) of every event delivery, attempt and run, oldest first.
    let mut items: Vec<(i64, String)> = Vec::new();
    for (d, attempts) in &deliveries {
        items.push((
            d.created_ms,
            format!(
                "{} <strong><code>{}</code></strong> published for <code>{}</code> {} <a href=\"/console/deliveries/{}\">delivery {}</a>",
                when(d.created_ms),
                esc(&d.event_type),
                esc(&d.endpoint),
                badge(&d.status),
                d.id,
                d.id
            ),
        ));
        for a in attempts {
            let what = match (a.status_code, &a.error) {
                (Some(c), _) => format!("HTTP {c}"),
                (None, Some(e)) => esc(e),
                _ => String::new(),
            };
            items.push((
                a.at_ms,
                format!(
                    "{} attempt to <code>{}</code>: {} in {} ms",
                    when(a.at_ms),
                    esc(&d.endpoint),
                    what,
                    a.duration_ms
                ),
            ));
        }
    }
    for r in &runs {
        items.push((
            r.created_ms,
            format!(
                "{} run <a href=\"/console/runs/{}\"><code>{}</code></a> of <code>{}</code> ({}) {}",
                when(r.created_ms),
                enc(&r.id),
                esc(&r.id),
                esc(&r.automation),
                esc(&r.trigger),
                badge(&r.status)
            ),
        ));
        for st in &r.steps {
            items.push((
                r.created_ms,
                format!(
                    "&nbsp;&nbsp;step {} <code>{}</code> {} {}",
                    st.index + 1,
                    esc(&st.kind),
                    badge(&st.status),
                    esc(&st.detail.chars().take(300).collect::<String>())
                ),
            ));
        }
    }
    items.sort_by_key(|(t, _)| *t);
    let mut b = format!("<h1>Call <code>{}</code></h1>", esc(id));
    if items.is_empty() {
        b.push_str("<p class=\"muted\">Nothing recorded for this call.</p>");
    }
    b.push_str("<div class=\"card\"><ol id=\"timeline\" class=\"timeline\">");
    for (_, h) in &items {
        let _ = write!(b, "<li>{h}</li>");
    }
    b.push_str("</ol></div><p class=\"muted\">What a call's outbox holds: every event its webhooks subscribe to (actions appear when a webhook subscribes to <code>action</code>), every attempt, and every automation run of the call.</p>");
    Ok(page(&format!("Call {id}"), "", Some(csrf), &b))
}
