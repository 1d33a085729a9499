//! The socket API's wire contract: one serde struct per JSON body of INTERFACE.md, shared by
//! the daemon's handlers (which build and serialize them) and the CLI's client (which
//! deserializes the very same types). There is no second copy of a shape anywhere.
//!
//! Rules the types encode:
//! - field names and order are INTERFACE.md's; an optional value is `null`, never absent;
//! - times are RFC 3339 UTC to the second (`2026-01-02T03:04:05Z`), read back from any RFC 3339
//!   offset or precision;
//! - answers carry no `deny_unknown_fields`, so a newer daemon's extra fields never break an
//!   older CLI; only the request bodies the daemon reads refuse unknown fields. One
//!   exception, on purpose: a connection `status` is one of INTERFACE.md's two values, and an
//!   older CLI refuses a third (a status it cannot act on is not one to guess at), while an
//!   event kind it does not know is shown as sent (`EventKind::Other`);
//! - the only token in any body is [`Token::access_token`] (and the refresh token or code of
//!   a [`NewConnection`] request), held as a [`Secret`] so that `Debug` never prints it.

use crate::model::{EventKind, Status, Time};
use crate::secret::Secret;
use axum::http::StatusCode;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// An error's machine-readable code: exactly INTERFACE.md's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed or names something that cannot be.
    BadRequest,
    /// 403: the peer may not do this.
    Forbidden,
    /// 404: no such connection, route or site.
    NotFound,
    /// 409: the provider rejected the chain; a person must consent again.
    NeedsReauth,
    /// 409: the request clashes with the ledger (a taken label, several connections).
    Conflict,
    /// 413: the body exceeds the API's limit.
    PayloadTooLarge,
    /// 503 with `Retry-After`: the provider failed transiently.
    ProviderUnavailable,
    /// 500: tokend's own failure.
    Internal,
}

impl ErrorCode {
    /// Every code, for the tests that check each against INTERFACE.md.
    #[cfg(test)]
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::BadRequest,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::NeedsReauth,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::ProviderUnavailable,
        ErrorCode::Internal,
    ];

    /// The HTTP status INTERFACE.md pairs with the code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::NeedsReauth | ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::ProviderUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether an answer with this code carries `Retry-After` (INTERFACE.md: only
    /// `provider_unavailable`).
    pub fn retry_after(self) -> bool {
        self == ErrorCode::ProviderUnavailable
    }

    /// The wire spelling (`not_found`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NeedsReauth => "needs_reauth",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::ProviderUnavailable => "provider_unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every error answer: `{"error": {"code", "message"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// One of INTERFACE.md's codes.
    pub code: ErrorCode,
    /// A sentence for a human; never a token or a secret.
    pub message: String,
}

/// `Connection` of INTERFACE.md: everything but its tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// Stable id (`c` and 12 hex digits).
    pub id: String,
    /// Unique human name.
    pub label: String,
    /// `atlassian`.
    pub provider: String,
    /// The account behind the chain; null when the provider hides it.
    pub account_id: Option<String>,
    /// Whether the chain is alive.
    pub status: Status,
    /// Scopes granted to the chain.
    pub scopes: Vec<String>,
    /// Sites the chain reaches.
    pub sites: Vec<Site>,
    /// When the current access token expires; null when there is none.
    #[serde(with = "opt_time")]
    pub access_token_expires_at: Option<Time>,
    /// When the refresh token was obtained.
    #[serde(with = "time")]
    pub refresh_token_rotated_at: Time,
    /// When tokend refreshes next; null when it will not (`needs_reauth`).
    #[serde(with = "opt_time")]
    pub next_rotation_at: Option<Time>,
    /// When the refresh token dies if unused.
    #[serde(with = "time")]
    pub inactivity_expires_at: Time,
    /// When consent runs out; null when unknown.
    #[serde(with = "opt_time")]
    pub absolute_expires_at: Option<Time>,
    /// When a refresh last succeeded.
    #[serde(with = "opt_time")]
    pub last_refresh_at: Option<Time>,
    /// The last failure, null after a success.
    pub last_error: Option<LastError>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// When the connection was created.
    #[serde(with = "time")]
    pub created_at: Time,
    /// When its ledger row last changed.
    #[serde(with = "time")]
    pub updated_at: Time,
    /// Which daemon holds the chain's refresh claim while a refresh is in flight on a shared
    /// (PostgreSQL) ledger, so that an operator sees what a refresh waits on. An addition to
    /// INTERFACE.md's `Connection`: only `GET /v1/connections/{id}` reads it (the list route
    /// would cost a ledger query per connection), and it is absent when nobody holds a claim,
    /// always with SQLite (one daemon, no claims) and on the list route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
}

/// `claim` of a [`Connection`]: the daemon refreshing the chain now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The holder: the daemon's `node_name` with its per-process suffix, as events name it.
    pub node: String,
    /// When the claim lapses unless renewed (by the database's clock): past it, another
    /// daemon may take the refresh over.
    #[serde(with = "time")]
    pub until: Time,
}

/// `last_error` of a [`Connection`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    /// A stable code (`invalid_grant`, `provider_unavailable`, ...).
    pub code: String,
    /// A sentence for a human.
    pub message: String,
    /// When it happened.
    #[serde(with = "time")]
    pub at: Time,
}

/// `Site` of INTERFACE.md.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    /// The cloud id.
    pub cloud_id: String,
    /// `https://acme.atlassian.net`.
    pub url: String,
    /// Display name.
    pub name: String,
    /// Scopes granted on the site.
    pub scopes: Vec<String>,
    /// API base URL by product (`confluence`, `jira`), sorted by product.
    pub api_base_urls: BTreeMap<String, String>,
    /// When accessible-resources last listed the site.
    #[serde(with = "time")]
    pub last_seen_at: Time,
}

impl Site {
    /// The site's host (`acme.atlassian.net`), else its raw url, else its cloud id: how the
    /// CLI names a site.
    pub fn host(&self) -> String {
        match url::Url::parse(&self.url) {
            Ok(url) if url.host_str().is_some() => url.host_str().unwrap_or_default().to_owned(),
            _ if !self.url.is_empty() => self.url.clone(),
            _ => self.cloud_id.clone(),
        }
    }
}

/// `Token` of INTERFACE.md: the only answer with a token. `Debug` redacts it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Token {
    /// The connection it belongs to.
    pub connection_id: String,
    /// The bearer token.
    #[serde(with = "secret")]
    pub access_token: Secret,
    /// Always `Bearer`.
    pub token_type: String,
    /// When it expires.
    #[serde(with = "time")]
    pub expires_at: Time,
    /// Seconds left when answered.
    pub expires_in: i64,
    /// The connection's scopes.
    pub scopes: Vec<String>,
    /// The connection's sites.
    pub sites: Vec<Site>,
}

/// The `token_type` of every [`Token`].
pub const BEARER: &str = "Bearer";

/// The fields of a [`Token`] answer that come from its connection (`scopes`, `sites`), in
/// its wire form with the closing brace: what [`token_json`] writes after the per-request
/// fields. The daemon renders it once per change of the connection and shares it across
/// answers, so that a cached token's answer builds no site list and formats no URL.
pub fn token_tail(scopes: &[String], sites: &[Site]) -> Box<[u8]> {
    /// [`Token`]'s last fields, in its order.
    #[derive(Serialize)]
    struct Tail<'a> {
        scopes: &'a [String],
        sites: &'a [Site],
    }
    let mut out = serde_json::to_vec(&Tail { scopes, sites }).unwrap_or_default();
    // `{"scopes":…}` without its opening brace: the rest of a Token object.
    if out.first() == Some(&b'{') {
        out.remove(0);
    }
    out.into_boxed_slice()
}

/// A [`Token`] answer, written field by field in [`Token`]'s order: byte for byte what
/// serializing the [`Token`] with these fields gives (a test holds it to that), without
/// building one. `tail` is [`token_tail`] of the connection's scopes and sites.
pub fn token_json(
    connection_id: &str,
    access_token: &Secret,
    expires_at: &Time,
    expires_in: i64,
    tail: &[u8],
) -> Vec<u8> {
    let token = access_token.expose();
    let mut out =
        Vec::with_capacity(TOKEN_JSON_FIXED + connection_id.len() + token.len() + tail.len());
    out.extend_from_slice(b"{\"connection_id\":");
    json_str(&mut out, connection_id);
    out.extend_from_slice(b",\"access_token\":");
    json_str(&mut out, token);
    out.extend_from_slice(b",\"token_type\":");
    json_str(&mut out, BEARER);
    out.extend_from_slice(b",\"expires_at\":\"");
    time::write(expires_at, &mut out);
    out.extend_from_slice(b"\",\"expires_in\":");
    if expires_in < 0 {
        out.push(b'-');
    }
    push_decimal(&mut out, expires_in.unsigned_abs(), 1);
    out.push(b',');
    out.extend_from_slice(tail);
    out
}

/// Appends `n` in decimal with at least `width` (at most 20) digits, zero-padded: what
/// `format!("{n:0width$}")` gives, without the formatting machinery.
fn push_decimal(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = start.min(digits.len().saturating_sub(width));
    out.extend_from_slice(&digits[start..]);
}

/// Room for [`token_json`]'s names, punctuation, time and number, with some to spare.
const TOKEN_JSON_FIXED: usize = 128;

/// Appends `s` as a JSON string (quoted, escaped as serde_json escapes).
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `Event` of INTERFACE.md: a line of a connection's history. Never a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened (for folded reads: the first).
    #[serde(with = "time")]
    pub at: Time,
    /// What happened; an unknown kind is kept as sent (see [`EventKind`]).
    pub kind: EventKind,
    /// A sentence for a human.
    pub message: String,
    /// The daemon that recorded it; null when unknown.
    pub node: Option<String>,
    /// The local process concerned (token reads); null otherwise.
    pub peer: Option<EventPeer>,
    /// Occurrences folded into this event.
    pub count: u32,
}

/// `peer` of an [`Event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPeer {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's pid; null when the kernel did not say.
    pub pid: Option<u32>,
}

/// `GET /v1/health`'s answer (200 `ok`, 503 `degraded`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `degraded`.
    pub status: HealthStatus,
    /// The daemon's version.
    pub version: String,
    /// `writable`, or `not writable: <why>`.
    pub ledger: String,
    /// Whether the scheduler loop beats.
    pub scheduler: SchedulerState,
    /// Names of the jobs that stopped firing (`[jobs]` keys).
    pub stalled_jobs: Vec<String>,
    /// Connections by status.
    pub connections: ConnectionCounts,
    /// Whether `[providers.atlassian]` is complete.
    pub provider_configured: bool,
    /// Rotated chains held in memory because the ledger refused them.
    pub commits_pending: usize,
}

/// `status` of [`Health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Everything works.
    Ok,
    /// The ledger, the scheduler or a job is failing (503).
    Degraded,
}

/// `scheduler` of [`Health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerState {
    /// The scheduler loop beats.
    Alive,
    /// It stopped beating.
    Stalled,
}

/// `connections` of [`Health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionCounts {
    /// Active connections.
    pub active: usize,
    /// Connections that need consent again.
    pub needs_reauth: usize,
}

/// `POST /v1/connections`' body: an import (`refresh_token`) or a consent (`code` and
/// `state`). Read by the daemon only, which refuses unknown fields.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewConnection {
    /// `atlassian`.
    pub provider: String,
    /// The new connection's label.
    pub label: String,
    /// An import's refresh token.
    #[serde(default, with = "opt_secret", skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// A consent's authorization code.
    #[serde(default, with = "opt_secret", skip_serializing_if = "Option::is_none")]
    pub code: Option<Secret>,
    /// A consent's `state`, as `POST /v1/authorizations` issued it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// `POST /v1/authorizations`' body. Read by the daemon only, which refuses unknown fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAuthorization {
    /// `atlassian`.
    pub provider: String,
}

/// `POST /v1/authorizations`' answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorization {
    /// The consent screen to open.
    pub authorize_url: String,
    /// The single-use `state`.
    pub state: String,
    /// Where the provider sends the browser back.
    pub redirect_uri: String,
}

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Status::parse(&s).ok_or_else(|| serde::de::Error::custom("not a connection status"))
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(EventKind::parse(&s))
    }
}

/// A time as RFC 3339 UTC to the second; read from any RFC 3339 form.
pub mod time {
    use super::*;
    use chrono::SecondsFormat;

    /// The wire form of a time.
    pub fn format(t: &Time) -> String {
        t.to_rfc3339_opts(SecondsFormat::Secs, true)
    }

    /// Appends [`format`] of `t` to `out`, without a `String` or the formatting machinery
    /// for the common case (years 0 to 9999, no leap second; anything else goes through
    /// [`format`]).
    pub fn write(t: &Time, out: &mut Vec<u8>) {
        use chrono::{Datelike, Timelike};
        let Ok(year) = u32::try_from(t.year()) else {
            out.extend_from_slice(format(t).as_bytes());
            return;
        };
        if year > 9999 || t.nanosecond() >= 1_000_000_000 {
            out.extend_from_slice(format(t).as_bytes());
            return;
        }
        let fields = [
            (year, b'-'),
            (t.month(), b'-'),
            (t.day(), b'T'),
            (t.hour(), b':'),
            (t.minute(), b':'),
            (t.second(), b'Z'),
        ];
        for (i, (n, after)) in fields.into_iter().enumerate() {
            super::push_decimal(out, u64::from(n), if i == 0 { 4 } else { 2 });
            out.push(after);
        }
    }

    /// Parses any RFC 3339 time (offset, fractions) into UTC.
    pub fn parse(s: &str) -> Option<Time> {
        chrono::DateTime::parse_from_rfc3339(s.trim())
            .ok()
            .map(|t| t.to_utc())
    }

    /// serde `with` serializer.
    pub fn serialize<S: Serializer>(t: &Time, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    /// serde `with` deserializer.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Time, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom("not an RFC 3339 time"))
    }
}

/// An optional time: [`time`], or `null`.
pub mod opt_time {
    use super::*;

    /// serde `with` serializer.
    pub fn serialize<S: Serializer>(t: &Option<Time>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::time::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    /// serde `with` deserializer.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Time>, D::Error> {
        Option::<std::borrow::Cow<'de, str>>::deserialize(d)?
            .map(|s| {
                super::time::parse(&s)
                    .ok_or_else(|| serde::de::Error::custom("not an RFC 3339 time"))
            })
            .transpose()
    }
}

/// A [`Secret`] on the wire: exposed only while serializing into the body.
mod secret {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Secret, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// An optional [`Secret`].
mod opt_secret {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(v.expose()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
        Option::<String>::deserialize(d).map(|v| v.map(Secret::new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::{Value, json};

    #[test]
    fn the_token_writer_writes_what_serde_writes() {
        let mut jira = site();
        jira.cloud_id = "2222\"quoted\\".into();
        jira.scopes = vec!["read:jira-work".into(), "write:jira-work".into()];
        jira.api_base_urls = [
            (
                "jira".to_owned(),
                "https://api.atlassian.com/ex/jira/2222".to_owned(),
            ),
            ("x\u{1}".to_owned(), "é\n".to_owned()),
        ]
        .into_iter()
        .collect();
        for (sites, scopes) in [
            (vec![], vec![]),
            (vec![site()], vec!["offline_access".to_owned()]),
            (
                vec![site(), jira],
                vec!["offline_access".to_owned(), "read:jira-work".to_owned()],
            ),
        ] {
            for (expires_at, expires_in) in [
                (t(3600), 3600),
                (t(0), 0),
                (chrono::Utc.timestamp_opt(-62_000_000_000, 0).unwrap(), 0),
                // Year 0, the first and last second of the 4-digit years, a year with
                // fewer digits, and the extreme numbers.
                (
                    chrono::Utc.timestamp_opt(-62_167_219_200, 0).unwrap(),
                    i64::MIN,
                ),
                (
                    chrono::Utc.timestamp_opt(-62_135_596_800, 0).unwrap(),
                    -1_000_001,
                ),
                (chrono::Utc.timestamp_opt(253_402_300_799, 0).unwrap(), 10),
                (chrono::Utc.timestamp_opt(-59_000_000_000, 0).unwrap(), 9),
                (
                    chrono::Utc.timestamp_opt(300_000_000_000, 7).unwrap(),
                    i64::MAX,
                ),
                (
                    chrono::Utc
                        .timestamp_opt(1_767_323_099, 1_500_000_000)
                        .unwrap(),
                    -1,
                ),
            ] {
                let token = Token {
                    connection_id: "c0123456789ab\u{7f}\"".into(),
                    access_token: Secret::new("at-\\/\u{2028}"),
                    token_type: BEARER.to_owned(),
                    expires_at,
                    expires_in,
                    scopes: scopes.clone(),
                    sites: sites.clone(),
                };
                let fast = token_json(
                    &token.connection_id,
                    &token.access_token,
                    &token.expires_at,
                    token.expires_in,
                    &token_tail(&token.scopes, &token.sites),
                );
                let slow = serde_json::to_vec(&token).unwrap();
                assert_eq!(
                    String::from_utf8(fast).unwrap(),
                    String::from_utf8(slow).unwrap()
                );
            }
        }
    }

    fn t(s: i64) -> Time {
        chrono::Utc.timestamp_opt(1_767_323_045 + s, 0).unwrap()
    }

    fn site() -> Site {
        Site {
            cloud_id: "1111".into(),
            url: "https://acme.atlassian.net".into(),
            name: "Acme".into(),
            scopes: vec!["read:page:confluence".into()],
            api_base_urls: [(
                "confluence".to_owned(),
                "https://api.atlassian.com/ex/confluence/1111".to_owned(),
            )]
            .into(),
            last_seen_at: t(0),
        }
    }

    fn connection() -> Connection {
        Connection {
            id: "c0123456789ab".into(),
            label: "conf".into(),
            provider: "atlassian".into(),
            account_id: None,
            status: Status::NeedsReauth,
            scopes: vec!["offline_access".into()],
            sites: vec![site()],
            access_token_expires_at: Some(t(3600)),
            refresh_token_rotated_at: t(0),
            next_rotation_at: None,
            inactivity_expires_at: t(90 * 86_400),
            absolute_expires_at: None,
            last_refresh_at: Some(t(1)),
            last_error: Some(LastError {
                code: "invalid_grant".into(),
                message: "rejected".into(),
                at: t(2),
            }),
            consecutive_failures: 3,
            created_at: t(-10),
            updated_at: t(2),
            claim: None,
        }
    }

    /// Serializes, checks the JSON, parses back and checks the value survived.
    fn round_trip<T>(v: &T, check: impl FnOnce(&Value)) -> T
    where
        T: Serialize + for<'de> Deserialize<'de>,
    {
        let text = serde_json::to_string(v).unwrap();
        check(&serde_json::from_str(&text).unwrap());
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn every_wire_type_round_trips() {
        let c = connection();
        let back = round_trip(&c, |v| {
            assert_eq!(v["status"], "needs_reauth");
            assert_eq!(v["account_id"], Value::Null, "null, not absent");
            assert_eq!(v["next_rotation_at"], Value::Null);
            assert_eq!(v["access_token_expires_at"], "2026-01-02T04:04:05Z");
            assert_eq!(v["sites"][0]["last_seen_at"], "2026-01-02T03:04:05Z");
            assert_eq!(
                v["sites"][0]["api_base_urls"]["confluence"],
                "https://api.atlassian.com/ex/confluence/1111"
            );
            assert_eq!(v["last_error"]["at"], "2026-01-02T03:04:07Z");
            assert_eq!(v.as_object().unwrap().len(), 17, "{v}");
        });
        assert_eq!(back, c);
        let claimed = Connection {
            claim: Some(Claim {
                node: "b#1a2b3c4d".into(),
                until: t(60),
            }),
            ..c.clone()
        };
        let back = round_trip(&claimed, |v| {
            assert_eq!(v["claim"]["node"], "b#1a2b3c4d");
            assert_eq!(v["claim"]["until"], "2026-01-02T03:05:05Z");
            assert_eq!(v.as_object().unwrap().len(), 18, "{v}");
        });
        assert_eq!(back, claimed);

        let token = Token {
            connection_id: c.id.clone(),
            access_token: Secret::new("at-very-secret"),
            token_type: BEARER.into(),
            expires_at: t(3600),
            expires_in: 3599,
            scopes: c.scopes.clone(),
            sites: vec![site()],
        };
        let back = round_trip(&token, |v| {
            assert_eq!(v["access_token"], "at-very-secret");
            assert_eq!(v["token_type"], "Bearer");
            assert_eq!(v["expires_in"], 3599);
        });
        assert_eq!(back.access_token.expose(), "at-very-secret");
        assert!(!format!("{token:?}").contains("at-very-secret"));
        assert_eq!(
            (back.expires_at, back.sites),
            (token.expires_at, token.sites)
        );

        for kind in EventKind::KNOWN
            .into_iter()
            .chain([EventKind::Other("from_the_future".into())])
        {
            let e = Event {
                at: t(5),
                kind: kind.clone(),
                message: "m".into(),
                node: Some("n1".into()),
                peer: Some(EventPeer {
                    uid: 1000,
                    pid: None,
                }),
                count: 2,
            };
            let back = round_trip(&e, |v| {
                assert_eq!(v["kind"], kind.as_str());
                assert_eq!(v["peer"], json!({"uid": 1000, "pid": null}));
            });
            assert_eq!(back, e);
        }

        let h = Health {
            status: HealthStatus::Degraded,
            version: "1.0".into(),
            ledger: "writable".into(),
            scheduler: SchedulerState::Alive,
            stalled_jobs: vec!["maintenance".into()],
            connections: ConnectionCounts {
                active: 2,
                needs_reauth: 1,
            },
            provider_configured: false,
            commits_pending: 0,
        };
        let back = round_trip(&h, |v| {
            assert_eq!(v["status"], "degraded");
            assert_eq!(v["scheduler"], "alive");
            assert_eq!(v["connections"], json!({"active": 2, "needs_reauth": 1}));
        });
        assert_eq!(back, h);

        let a = Authorization {
            authorize_url: "https://auth.example/authorize?x".into(),
            state: "s".into(),
            redirect_uri: "http://localhost:8976/callback".into(),
        };
        assert_eq!(round_trip(&a, |_| {}), a);
        let na = NewAuthorization {
            provider: "atlassian".into(),
        };
        assert_eq!(
            round_trip(&na, |v| assert_eq!(v, &json!({"provider": "atlassian"}))),
            na
        );

        let import = NewConnection {
            provider: "atlassian".into(),
            label: "conf".into(),
            refresh_token: Some(Secret::new("rt-1")),
            code: None,
            state: None,
        };
        let back = round_trip(&import, |v| {
            assert_eq!(
                v,
                &json!({"provider": "atlassian", "label": "conf", "refresh_token": "rt-1"}),
                "absent, not null: the daemon takes either refresh_token or code and state"
            );
        });
        assert_eq!(back.refresh_token.unwrap().expose(), "rt-1");
        assert!(!format!("{import:?}").contains("rt-1"));

        let err = ErrorBody {
            error: ErrorDetail {
                code: ErrorCode::NeedsReauth,
                message: "consent again".into(),
            },
        };
        let back = round_trip(&err, |v| {
            assert_eq!(
                v,
                &json!({"error": {"code": "needs_reauth", "message": "consent again"}})
            );
        });
        assert_eq!(back, err);
    }

    #[test]
    fn error_codes_are_interface_md_strings_and_statuses() {
        let want = [
            ("bad_request", 400),
            ("forbidden", 403),
            ("not_found", 404),
            ("needs_reauth", 409),
            ("conflict", 409),
            ("payload_too_large", 413),
            ("provider_unavailable", 503),
            ("internal", 500),
        ];
        assert_eq!(ErrorCode::ALL.len(), want.len());
        for (code, (text, status)) in ErrorCode::ALL.into_iter().zip(want) {
            assert_eq!(serde_json::to_value(code).unwrap(), text);
            assert_eq!(code.as_str(), text);
            assert_eq!(code.status().as_u16(), status, "{text}");
            assert_eq!(code.retry_after(), text == "provider_unavailable");
            assert_eq!(
                serde_json::from_value::<ErrorCode>(json!(text)).unwrap(),
                code
            );
        }
    }

    #[test]
    fn answers_tolerate_extra_fields_and_any_rfc3339_form() {
        let mut v = serde_json::to_value(connection()).unwrap();
        v["from_a_newer_daemon"] = json!({"x": 1});
        v["sites"][0]["also_new"] = json!(true);
        v["created_at"] = json!("2026-01-02T04:04:05.123456+01:00");
        let c: Connection = serde_json::from_value(v).unwrap();
        assert_eq!(time::format(&c.created_at), "2026-01-02T03:04:05Z");
        let mut v = serde_json::to_value(connection()).unwrap();
        v["created_at"] = json!("yesterday");
        assert!(serde_json::from_value::<Connection>(v).is_err());
    }

    #[test]
    fn request_bodies_refuse_unknown_fields() {
        let r = serde_json::from_value::<NewAuthorization>(
            json!({"provider": "atlassian", "extra": 1}),
        );
        assert!(r.is_err());
    }
}
