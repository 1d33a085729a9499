//! The HTTP shell of the fake: the routes, how strict the token endpoint is about requests
//! (JSON body, client credentials in it), the injected faults, and the shapes of answers
//! (token responses, OAuth error bodies, accessible-resources, `/me`). What a grant does to
//! the chains is decided by the rules (`rules.rs`).

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::rules::{Chains, Decision};
use super::{
    CLIENT_ID, CLIENT_SECRET, Endpoint, ErrorShape, FakeSite, Fault, Inner, LoggedRequest, Outcome,
    Shared, lock,
};

/// Largest request body the fake reads.
const MAX_BODY: usize = 1024 * 1024;

/// A response computed under the lock, sent after it is released.
struct Planned {
    status: u16,
    headers: Vec<(&'static str, String)>,
    content_type: &'static str,
    body: Vec<u8>,
    delay: Duration,
    disconnect: bool,
}

impl Planned {
    fn json(status: u16, body: Value) -> Planned {
        Planned {
            status,
            headers: Vec::new(),
            content_type: "application/json",
            body: body.to_string().into_bytes(),
            delay: Duration::ZERO,
            disconnect: false,
        }
    }

    fn oauth_error(status: u16, error: &str, description: &str) -> Planned {
        Planned::json(
            status,
            json!({"error": error, "error_description": description}),
        )
    }

    fn html(status: u16, body: &str) -> Planned {
        Planned {
            content_type: "text/html; charset=utf-8",
            body: body.as_bytes().to_vec(),
            ..Planned::json(status, Value::Null)
        }
    }

    /// Applies a before-processing fault, if `fault` is one.
    fn pre_fault(fault: &Fault) -> Option<Planned> {
        match fault {
            Fault::Status(s) => Some(Planned::json(
                *s,
                json!({"error": "server_error", "error_description": format!("injected status {s}")}),
            )),
            Fault::Html(s) => Some(Planned::html(
                *s,
                &format!(
                    "<html><head><title>{s}</title></head><body><h1>{s} Bad Gateway</h1></body></html>"
                ),
            )),
            Fault::RateLimited { retry_after_secs } => {
                let mut p = Planned::json(
                    429,
                    json!({"error": "too_many_requests", "error_description": "Rate limit exceeded"}),
                );
                p.headers
                    .push(("retry-after", retry_after_secs.to_string()));
                Some(p)
            }
            Fault::Unavailable { retry_after_secs } => {
                let mut p = Planned::json(
                    503,
                    json!({"error": "temporarily_unavailable", "error_description": "Service Unavailable"}),
                );
                p.headers
                    .push(("retry-after", retry_after_secs.to_string()));
                Some(p)
            }
            _ => None,
        }
    }

    /// Applies an after-processing fault.
    fn post_fault(&mut self, fault: &Fault) {
        match fault {
            Fault::MalformedJson => {
                let cut = (self.body.len() / 2).max(1).min(self.body.len());
                self.body.truncate(cut);
            }
            Fault::Delay(d) => self.delay += *d,
            Fault::Disconnect => self.disconnect = true,
            _ => {}
        }
    }

    fn into_response(self) -> Response {
        let body = if self.disconnect {
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from(self.body[..self.body.len() / 2].to_vec())),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "fake: injected disconnect",
                )),
            ];
            Body::from_stream(futures_util::stream::iter(chunks))
        } else {
            Body::from(self.body)
        };
        let mut resp = Response::new(body);
        *resp.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        }
        resp
    }
}

pub(super) async fn handle(State(state): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY).await;
    let path = parts.uri.path().to_string();
    let arrived = Instant::now();
    let planned = {
        let mut g = lock(&state);
        let mut entry = LoggedRequest {
            at: arrived,
            method: parts.method.to_string(),
            path: path.clone(),
            grant_type: None,
            account: None,
            status: 0,
            outcome: Outcome::NotFound,
            fault: None,
        };
        let planned = match (&parts.method, path.as_str()) {
            (&Method::POST, "/oauth/token") => {
                token_endpoint(&mut g, &parts.headers, body.ok(), &mut entry)
            }
            (&Method::GET, "/oauth/token/accessible-resources") => {
                bearer_endpoint(&mut g, &parts.headers, Endpoint::Resources, &mut entry)
            }
            (&Method::GET, "/me") => {
                bearer_endpoint(&mut g, &parts.headers, Endpoint::Me, &mut entry)
            }
            (&Method::GET, "/authorize") => {
                entry.outcome = Outcome::AuthorizePage;
                Planned::html(
                    200,
                    "<html><body>fake consent page: tests mint codes directly</body></html>",
                )
            }
            _ => Planned::json(404, json!({"error": "not_found"})),
        };
        entry.status = planned.status;
        g.log.push(entry);
        planned
    };
    if !planned.delay.is_zero() {
        tokio::time::sleep(planned.delay).await;
    }
    planned.into_response()
}

fn is_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

fn invalid_grant() -> Planned {
    Planned::oauth_error(403, "invalid_grant", "Unknown or invalid refresh token.")
}

fn token_endpoint(
    g: &mut Inner,
    headers: &axum::http::HeaderMap,
    body: Option<Bytes>,
    entry: &mut LoggedRequest,
) -> Planned {
    let parsed: Option<serde_json::Map<String, Value>> = body
        .as_ref()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        });
    entry.grant_type = parsed
        .as_ref()
        .and_then(|m| m.get("grant_type"))
        .and_then(|v| v.as_str())
        .map(str::to_string);

    let fault = g.pop_fault(Endpoint::Token);
    entry.fault = fault.clone();
    if let Some(f) = &fault
        && let Some(p) = Planned::pre_fault(f)
    {
        entry.outcome = Outcome::Injected(f.clone());
        return p;
    }
    let token_delay = g.token_delay;
    let mut planned = token_logic(g, headers, parsed.as_ref(), fault.as_ref(), entry);
    planned.delay += token_delay;
    if let Some(f) = &fault {
        planned.post_fault(f);
    }
    planned
}

fn token_logic(
    g: &mut Inner,
    headers: &axum::http::HeaderMap,
    body: Option<&serde_json::Map<String, Value>>,
    fault: Option<&Fault>,
    entry: &mut LoggedRequest,
) -> Planned {
    if !is_json_content_type(headers) {
        entry.outcome = Outcome::BadRequest;
        return Planned::oauth_error(
            400,
            "invalid_request",
            "Content-Type must be application/json",
        );
    }
    let Some(body) = body else {
        entry.outcome = Outcome::BadRequest;
        return Planned::oauth_error(400, "invalid_request", "Invalid JSON body");
    };
    let s = |name: &str| body.get(name).and_then(|v| v.as_str());
    if s("client_id") != Some(CLIENT_ID) || s("client_secret") != Some(CLIENT_SECRET) {
        entry.outcome = Outcome::BadClient;
        return Planned::oauth_error(401, "access_denied", "Unauthorized");
    }
    match s("grant_type") {
        Some("refresh_token") => {
            let Some(rt) = s("refresh_token") else {
                entry.outcome = Outcome::BadRequest;
                return Planned::oauth_error(
                    400,
                    "invalid_request",
                    "Missing required parameter: refresh_token",
                );
            };
            let decision = g.rules.refresh(rt, fault != Some(&Fault::OmitRefreshToken));
            answer(g, decision, fault, entry)
        }
        Some("authorization_code") => {
            let (Some(code), Some(redirect_uri)) = (s("code"), s("redirect_uri")) else {
                entry.outcome = Outcome::BadCode;
                return Planned::oauth_error(
                    400,
                    "invalid_request",
                    "authorization_code is invalid",
                );
            };
            let decision = g.rules.exchange_code(code, redirect_uri);
            answer(g, decision, fault, entry)
        }
        Some(_) => {
            entry.outcome = Outcome::UnsupportedGrant;
            Planned::oauth_error(400, "unsupported_grant_type", "Unsupported grant type")
        }
        None => {
            entry.outcome = Outcome::BadRequest;
            Planned::oauth_error(
                400,
                "invalid_request",
                "Missing required parameter: grant_type",
            )
        }
    }
}

fn token_success(
    g: &Chains,
    account: &str,
    access_token: &str,
    refresh_token: Option<&str>,
    fault: Option<&Fault>,
) -> Planned {
    let mut body = serde_json::Map::new();
    if fault == Some(&Fault::RefreshTokenOnly) {
        if let Some(rt) = refresh_token {
            body.insert("refresh_token".into(), json!(rt));
        }
        return Planned::json(200, Value::Object(body));
    }
    body.insert("access_token".into(), json!(access_token));
    if let Some(rt) = refresh_token {
        body.insert("refresh_token".into(), json!(rt));
    }
    if let Some(life) = g.access_lifetime
        && fault != Some(&Fault::OmitExpiresIn)
    {
        body.insert("expires_in".into(), json!(life.as_secs()));
    }
    body.insert("scope".into(), json!(g.scope_of(account)));
    body.insert("token_type".into(), json!("Bearer"));
    Planned::json(200, Value::Object(body))
}

/// The answer to a grant the rules decided.
fn answer(
    g: &Inner,
    decision: Decision,
    fault: Option<&Fault>,
    entry: &mut LoggedRequest,
) -> Planned {
    entry.outcome = decision.outcome.clone();
    entry.account = decision.account.clone();
    match (decision.issued, decision.account) {
        (Some(issued), Some(account)) => token_success(
            &g.rules,
            &account,
            &issued.access_token,
            issued.refresh_token.as_deref(),
            fault,
        ),
        _ => match decision.outcome {
            Outcome::BadCode => {
                Planned::oauth_error(400, "invalid_request", "authorization_code is invalid")
            }
            Outcome::FamilyRevoked => match g.error_shape {
                ErrorShape::InvalidGrant => invalid_grant(),
                ErrorShape::UnauthorizedClient => {
                    Planned::oauth_error(403, "unauthorized_client", "refresh_token is invalid")
                }
            },
            _ => invalid_grant(),
        },
    }
}

fn bearer_endpoint(
    g: &mut Inner,
    headers: &axum::http::HeaderMap,
    endpoint: Endpoint,
    entry: &mut LoggedRequest,
) -> Planned {
    let fault = g.pop_fault(endpoint);
    entry.fault = fault.clone();
    if let Some(f) = &fault
        && let Some(p) = Planned::pre_fault(f)
    {
        entry.outcome = Outcome::Injected(f.clone());
        return p;
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    let account = token.and_then(|t| g.rules.check_access(t));
    let mut planned = match account {
        None => {
            entry.outcome = Outcome::Unauthorized;
            let mut p = Planned::json(401, json!({"code": 401, "message": "Unauthorized"}));
            p.headers.push((
                "www-authenticate",
                "Bearer realm=\"api.atlassian.com\"".into(),
            ));
            p
        }
        Some(account) => {
            entry.account = Some(account.clone());
            match endpoint {
                Endpoint::Me if g.rules.hidden.contains(&account) => {
                    entry.outcome = Outcome::Hidden;
                    Planned::json(
                        403,
                        json!({"code": 403, "message": "The app is not authorized to access this resource (read:me)"}),
                    )
                }
                Endpoint::Me => {
                    entry.outcome = Outcome::Served;
                    Planned::json(
                        200,
                        json!({
                            "account_type": "atlassian",
                            "account_id": account,
                            "email": format!("{account}@example.test"),
                            "name": format!("Test User {account}"),
                            "picture": "https://avatar-management.example.test/default.png",
                            "account_status": "active",
                            "nickname": account,
                            "zoneinfo": "UTC",
                            "locale": "en-US",
                        }),
                    )
                }
                _ => {
                    entry.outcome = Outcome::Served;
                    let sites: Vec<Value> = g
                        .rules
                        .families
                        .get(&account)
                        .map(|f| f.sites.iter().map(FakeSite::to_json).collect())
                        .unwrap_or_default();
                    Planned::json(200, Value::Array(sites))
                }
            }
        }
    };
    if let Some(f) = &fault {
        planned.post_fault(f);
    }
    planned
}
