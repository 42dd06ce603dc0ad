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

use crate::automation::Automations;
use crate::server::admin::{self, Admin, ApiError};
use crate::time;

mod pages;
use pages::*;

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

const STYLE: &str = include_str!("console.css");

const SCRIPT: &str = include_str!("console.js");

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
