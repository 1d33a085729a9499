//! The classification of every provider answer, once: a token response into a [`Grant`]
//! (or [`ProviderError::Partial`] when a broken answer still carries a new refresh token),
//! accessible-resources into sites, `/me` into an [`Account`], and every failure into a
//! [`ProviderError`].
//!
//! **Architecture Invariant: only a definite rejection condemns a chain.** Only
//! `invalid_grant` or `unauthorized_client`, in an OAuth error object with status 400, 401 or
//! 403, is [`ProviderError::Rejected`] (which marks the connection `needs_reauth`); this file
//! is the only place that decides it. Everything else (`access_denied` from a wrong client
//! secret, 5xx, 429, timeouts, bodies that are not JSON objects) is
//! [`ProviderError::Transient`], with whether the request may have been processed.
//!
//! Provider texts are scrubbed of every secret sent and shortened; JSON errors are described
//! by category and position, never by their `Display` (which quotes the body).
//!
//! **Control characters** (NUL and the rest of Unicode's `Cc`) never pass into a stored
//! value: a ledger column cannot hold NUL (PostgreSQL's TEXT refuses it), and a write that
//! fails the same way every time would hold a rotated token in memory for ever. So a scope
//! holding one is malformed and dropped (the grant and its tokens are kept whatever the
//! scope string says: losing a chain over a scope would be far worse); a site whose id or
//! URL holds one is malformed and left out (its name only loses the characters); a `/me`
//! account id holding one is a malformed answer ([`TransientKind::Malformed`]), never an
//! identity to merge on.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;

use super::{Account, Grant};
use crate::model::{Site, Time};
use crate::secret::Secret;

/// Longest provider text kept in an error message: enough to be useful, short enough that a
/// provider echoing a body back cannot flood the ledger and logs.
pub(super) const MAX_DESCRIPTION: usize = 200;

/// The largest `Retry-After` honoured. A provider asking for more is capped so that a bogus
/// header cannot park a chain past its inactivity expiry.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// Why a transient failure happened: decides whether the request may have been processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransientKind {
    /// The connection could not be made: the request never left.
    Connect,
    /// No answer within `refresh.request_timeout` (or the connection broke mid-way): the
    /// provider may have rotated the token.
    Timeout,
    /// 429: the provider asks us to slow down; the request was not processed.
    RateLimited,
    /// 5xx or 408: the provider failed; it may or may not have rotated the token.
    ServerError,
    /// A 2xx whose body could not be understood: the provider did rotate the token.
    Malformed,
    /// A 4xx that is not a definite rejection of the chain (e.g. `invalid_client`: a
    /// configuration problem, not the chain's fault).
    Refused,
}

/// A failed provider call.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider definitely refused the chain (`invalid_grant`, `unauthorized_client`
    /// with 400/401/403): a person has to consent again.
    #[error("{code}: {description}")]
    Rejected {
        /// The OAuth error code.
        code: String,
        /// The provider's description, scrubbed and shortened.
        description: String,
    },
    /// Anything else: try again later.
    #[error("{message}")]
    Transient {
        /// What kind of failure.
        kind: TransientKind,
        /// The provider's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// A sentence for a human, without secrets.
        message: String,
    },
    /// A 2xx answer that is not a usable token response but carries a new refresh token:
    /// the provider rotated the chain, so the old token is spent and this one must be kept.
    #[error("{message}")]
    Partial {
        /// The new refresh token.
        refresh_token: Secret,
        /// What was wrong with the answer, without secrets.
        message: String,
    },
    /// tokend lacks what it needs to talk to the provider (client id or secret).
    #[error("{0}")]
    NotConfigured(String),
}

impl ProviderError {
    /// Whether the request may have reached the provider and rotated the refresh token, so
    /// that the outcome is unknown and the same token must be retried inside the leeway.
    pub fn maybe_processed(&self) -> bool {
        match self {
            ProviderError::Transient { kind, .. } => matches!(
                kind,
                TransientKind::Timeout | TransientKind::ServerError | TransientKind::Malformed
            ),
            _ => false,
        }
    }

    /// A stable code for `last_error` and metrics.
    pub fn code(&self) -> String {
        match self {
            ProviderError::Rejected { code, .. } => code.clone(),
            ProviderError::Transient { kind, .. } => match kind {
                TransientKind::Connect => "connect_error",
                TransientKind::Timeout => "timeout",
                TransientKind::RateLimited => "rate_limited",
                TransientKind::ServerError => "server_error",
                TransientKind::Malformed => "malformed_response",
                TransientKind::Refused => "refused",
            }
            .to_owned(),
            ProviderError::Partial { .. } => "malformed_response".to_owned(),
            ProviderError::NotConfigured(_) => "not_configured".to_owned(),
        }
    }

    /// The provider's `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct ResourceBody {
    id: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Deserialize)]
struct MeBody {
    account_id: Option<String>,
}
/// Reads a 2xx answer of the token endpoint. A body that is not a full token response but
/// does carry a new `refresh_token` is [`ProviderError::Partial`]: the provider rotated, and
/// the new token is all that is left of the chain.
pub(super) fn parse_grant(status: StatusCode, bytes: &[u8]) -> Result<Grant, ProviderError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ProviderError::Transient {
            kind: TransientKind::Malformed,
            retry_after: None,
            message: format!(
                "the token endpoint answered {status} with a body that is not a token response ({})",
                json_problem(&e)
            ),
        })?;
    let salvage = |why: String| {
        let rotated = value
            .get("refresh_token")
            .and_then(|v| v.as_str())
            .filter(|r| !r.is_empty());
        match rotated {
            Some(rt) => ProviderError::Partial {
                refresh_token: Secret::new(rt),
                message: format!("{why}; it did carry a new refresh token, which tokend keeps"),
            },
            None => ProviderError::Transient {
                kind: TransientKind::Malformed,
                retry_after: None,
                message: why,
            },
        }
    };
    // From a borrow: a copy of the tree would hold both tokens in plain, unwiped Strings.
    let parsed: TokenBody = match TokenBody::deserialize(&value) {
        Ok(p) => p,
        Err(e) => {
            return Err(salvage(format!(
                "the token endpoint answered {status} with a body that is not a token response ({})",
                json_problem(&e)
            )));
        }
    };
    let Some(access) = parsed.access_token.filter(|a| !a.is_empty()) else {
        return Err(salvage(format!(
            "the token endpoint answered {status} without an access_token"
        )));
    };
    Ok(Grant {
        access_token: Secret::new(access),
        refresh_token: parsed
            .refresh_token
            .filter(|r| !r.is_empty())
            .map(Secret::new),
        expires_in: parsed.expires_in.as_ref().and_then(parse_expires_in),
        scopes: parsed.scope.map(|s| clean_scopes(s.split_whitespace())),
    })
}

/// Whether `s` holds a control character (see the module doc).
fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// The scopes without those holding a control character (malformed, dropped).
fn clean_scopes<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    scopes
        .into_iter()
        .filter(|s| !has_control(s))
        .map(str::to_owned)
        .collect()
}

/// Reads an answer of accessible-resources: the sites a token reaches, as of `now`.
pub(super) fn parse_resources(
    status: StatusCode,
    retry_after: Option<Duration>,
    bytes: &[u8],
    now: Time,
) -> Result<Vec<Site>, ProviderError> {
    if !status.is_success() {
        return Err(api_error("accessible-resources", status, retry_after));
    }
    let list: Vec<ResourceBody> =
        serde_json::from_slice(bytes).map_err(|e| ProviderError::Transient {
            kind: TransientKind::Malformed,
            retry_after: None,
            message: format!(
                "accessible-resources answered a body that is not a list of sites ({})",
                json_problem(&e)
            ),
        })?;
    Ok(list
        .into_iter()
        // A site's identity with a control character is malformed: left out.
        .filter(|r| !has_control(&r.id) && !has_control(&r.url))
        .map(|r| Site {
            cloud_id: r.id.into(),
            url: r.url.into(),
            name: r.name.chars().filter(|c| !c.is_control()).collect(),
            scopes: clean_scopes(r.scopes.iter().map(String::as_str)).into(),
            last_seen_at: now,
        })
        .collect())
}

/// Reads an answer of `/me`: `Ok(None)` for 401/403 (the provider will not say) and for a
/// profile without an account id.
pub(super) fn parse_me(
    status: StatusCode,
    retry_after: Option<Duration>,
    bytes: &[u8],
) -> Result<Option<Account>, ProviderError> {
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(api_error("/me", status, retry_after));
    }
    let me: MeBody = serde_json::from_slice(bytes).map_err(|e| ProviderError::Transient {
        kind: TransientKind::Malformed,
        retry_after: None,
        message: format!(
            "/me answered a body that is not a profile ({})",
            json_problem(&e)
        ),
    })?;
    if me.account_id.as_deref().is_some_and(has_control) {
        return Err(ProviderError::Transient {
            kind: TransientKind::Malformed,
            retry_after: None,
            message: "/me answered an account_id holding a control character".into(),
        });
    }
    Ok(me
        .account_id
        .filter(|a| !a.is_empty())
        .map(|account_id| Account { account_id }))
}

pub(super) fn transport_error(e: reqwest::Error) -> ProviderError {
    // reqwest's Display includes the URL, which holds no secret (tokens travel in bodies
    // and headers); walk the source chain for the useful part.
    let kind = if e.is_connect() {
        TransientKind::Connect
    } else {
        TransientKind::Timeout
    };
    let mut causes = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        causes.push_str(": ");
        causes.push_str(&s.to_string());
        source = s.source();
    }
    let message = format!("{}{causes}", e.without_url());
    ProviderError::Transient {
        kind,
        retry_after: None,
        message: shorten(&message),
    }
}

/// Describes a JSON error without its Display, which can quote values from the body.
pub(super) fn json_problem(e: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

/// The kind of a non-2xx answer that is not a rejection: 429 asks to slow down, 5xx and
/// 408 are the provider's failure, any other status refuses the request.
fn kind_of_status(status: StatusCode) -> TransientKind {
    if status == StatusCode::TOO_MANY_REQUESTS {
        TransientKind::RateLimited
    } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        TransientKind::ServerError
    } else {
        TransientKind::Refused
    }
}

/// A non-2xx answer of accessible-resources or `/me` (never a rejection of the chain).
pub(super) fn api_error(
    what: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
) -> ProviderError {
    let kind = kind_of_status(status);
    ProviderError::Transient {
        kind,
        retry_after,
        message: format!("{what} answered {status}"),
    }
}

/// Classifies a non-2xx answer of the token endpoint.
pub(super) fn classify_error(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    sent_secrets: &[&str],
) -> ProviderError {
    // An OAuth error response is a JSON object (RFC 6749 §5.2). serde would also read the
    // struct from an array (`["invalid_grant"]`), which is no error response and must not
    // condemn a chain.
    let parsed: Option<ErrorBody> = body
        .trim_ascii_start()
        .starts_with(b"{")
        .then(|| serde_json::from_slice(body).ok())
        .flatten();
    let code = parsed.as_ref().and_then(|b| b.error.clone());
    let description = parsed
        .as_ref()
        .and_then(|b| b.error_description.clone())
        .map(|d| scrub(&d, sent_secrets))
        .unwrap_or_default();
    let definite_status = matches!(status.as_u16(), 400 | 401 | 403);
    if let Some(code) = &code {
        // Only these two say "this chain is dead". `access_denied` with a 401 is what a wrong
        // client secret looks like: a configuration problem that must not condemn every
        // chain, so it stays transient (it shows in last_error and the logs).
        if definite_status && (code == "invalid_grant" || code == "unauthorized_client") {
            return ProviderError::Rejected {
                code: scrub(code, sent_secrets),
                description: if description.is_empty() {
                    "the provider rejected the refresh token".to_owned()
                } else {
                    description
                },
            };
        }
    }
    let kind = kind_of_status(status);
    let mut message = format!("the token endpoint answered {status}");
    if let Some(code) = code {
        message.push_str(&format!(" ({}", scrub(&code, sent_secrets)));
        if !description.is_empty() {
            message.push_str(&format!(": {description}"));
        }
        message.push(')');
    }
    ProviderError::Transient {
        kind,
        retry_after,
        message,
    }
}

/// Parses `Retry-After` as delay-seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate_parse(value)?;
        (at - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

pub(super) fn httpdate_parse(value: &str) -> Option<Time> {
    chrono::DateTime::parse_from_rfc2822(value)
        .ok()
        .map(|d| d.with_timezone(&chrono::Utc))
}

pub(super) fn parse_expires_in(v: &serde_json::Value) -> Option<Duration> {
    let secs = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)))
}

/// Removes any secret that was sent from a provider text and shortens it. Should a secret
/// show up again in the result (one that is a piece of the marker, holds a space where the
/// text had a control character, or ends in the `…` of the cut), none of the text is kept.
pub(super) fn scrub(text: &str, sent_secrets: &[&str]) -> String {
    let secrets: Vec<&str> = sent_secrets
        .iter()
        .copied()
        .filter(|s| s.len() >= 4)
        .collect();
    let mut out = text.to_owned();
    for s in &secrets {
        out = out.replace(s, "[redacted]");
    }
    let out = shorten(&out);
    if secrets.iter().any(|s| out.contains(s)) {
        return String::new();
    }
    out
}

pub(super) fn shorten(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= MAX_DESCRIPTION {
        clean
    } else {
        let mut s: String = clean.chars().take(MAX_DESCRIPTION).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, body: &str) -> ProviderError {
        classify_error(
            StatusCode::from_u16(status).unwrap(),
            None,
            body.as_bytes(),
            &["rt-secret-1234"],
        )
    }

    #[test]
    fn control_characters_never_reach_a_stored_value() {
        // A NUL in a scope: the scope goes, the grant and both tokens stay.
        let g = parse_grant(
            StatusCode::OK,
            br#"{"access_token":"at-1","refresh_token":"rt-2","expires_in":3600,"scope":"read:jira-work bad\u0000scope offline_access \u0007"}"#,
        )
        .unwrap();
        assert_eq!(g.access_token.expose(), "at-1");
        assert_eq!(g.refresh_token.unwrap().expose(), "rt-2");
        assert_eq!(
            g.scopes.unwrap(),
            vec!["read:jira-work".to_owned(), "offline_access".to_owned()]
        );
        // Sites: an id or URL with one is left out, a name loses it, a scope with one goes.
        let sites = parse_resources(
            StatusCode::OK,
            None,
            br#"[{"id":"c\u00001","url":"https://a.atlassian.net","name":"a","scopes":[]},
                 {"id":"c2","url":"https://b.atlassian.net\u0000","name":"b","scopes":[]},
                 {"id":"c3","url":"https://c.atlassian.net","name":"c\u0000c","scopes":["x","y\u0000"]}]"#,
            chrono::Utc::now(),
        )
        .unwrap();
        assert_eq!(sites.len(), 1);
        assert_eq!(&*sites[0].cloud_id, "c3");
        assert_eq!(&*sites[0].name, "cc");
        assert_eq!(sites[0].scopes, vec!["x".to_owned()]);
        // /me: an account id with one is a malformed answer, not an identity.
        let err = parse_me(StatusCode::OK, None, br#"{"account_id":"acc\u0000-1"}"#)
            .expect_err("a NUL in an account id");
        assert!(
            matches!(
                err,
                ProviderError::Transient {
                    kind: TransientKind::Malformed,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn invalid_grant_and_unauthorized_client_are_rejections() {
        for (status, body) in [
            (
                403,
                r#"{"error":"invalid_grant","error_description":"Unknown or invalid refresh token."}"#,
            ),
            (
                403,
                r#"{"error":"unauthorized_client","error_description":"refresh_token is invalid"}"#,
            ),
            (400, r#"{"error":"invalid_grant"}"#),
            (401, r#"{"error":"unauthorized_client"}"#),
        ] {
            let e = classify(status, body);
            assert!(
                matches!(e, ProviderError::Rejected { .. }),
                "{status} {body}: {e:?}"
            );
            assert!(!e.maybe_processed());
        }
    }

    #[test]
    fn everything_else_is_transient() {
        for (status, body, kind) in [
            (500, "<html>oops</html>", TransientKind::ServerError),
            (
                503,
                r#"{"error":"invalid_grant"}"#,
                TransientKind::ServerError,
            ),
            (429, "", TransientKind::RateLimited),
            (408, "", TransientKind::ServerError),
            (
                401,
                r#"{"error":"access_denied","error_description":"Unauthorized"}"#,
                TransientKind::Refused,
            ),
            (
                400,
                r#"{"error":"invalid_request"}"#,
                TransientKind::Refused,
            ),
            (403, "not json", TransientKind::Refused),
        ] {
            match classify(status, body) {
                ProviderError::Transient { kind: k, .. } => assert_eq!(k, kind, "{status} {body}"),
                other => panic!("{status} {body}: {other:?}"),
            }
        }
    }

    #[test]
    fn provider_text_is_scrubbed_of_the_sent_token() {
        let e = classify(
            403,
            r#"{"error":"invalid_grant","error_description":"token rt-secret-1234 is unknown"}"#,
        );
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("rt-secret-1234"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        let long = format!(
            r#"{{"error":"x","error_description":"{}"}}"#,
            "a".repeat(5000)
        );
        assert!(classify(400, &long).to_string().len() < 400);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "5".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(5)));
        h.insert(RETRY_AFTER, "999999999".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(MAX_RETRY_AFTER));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        h.insert(RETRY_AFTER, later.parse().unwrap());
        let d = parse_retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn expires_in_forms() {
        assert_eq!(
            parse_expires_in(&serde_json::json!(3600)),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_expires_in(&serde_json::json!("60")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_expires_in(&serde_json::json!(-1)), None);
        assert_eq!(parse_expires_in(&serde_json::json!(null)), None);
    }

    #[test]
    fn ambiguity_follows_the_kind() {
        let t = |kind| ProviderError::Transient {
            kind,
            retry_after: None,
            message: String::new(),
        };
        assert!(!t(TransientKind::Connect).maybe_processed());
        assert!(!t(TransientKind::RateLimited).maybe_processed());
        assert!(t(TransientKind::Timeout).maybe_processed());
        assert!(t(TransientKind::ServerError).maybe_processed());
        assert!(t(TransientKind::Malformed).maybe_processed());
    }
}
