//! The domain records every module shares: a connection, its sites, and its chain.
//!
//! These types carry no serde derives: the ledger maps them to rows and the API maps them to
//! its wire types (`wire`, which also gives [`Status`] and [`EventKind`] their JSON
//! form, the same spelling as their `as_str`). [`Connection`] is the public face of a connection (safe to show anyone who may list
//! connections); [`Chain`] is the secret part (refresh and access tokens) and never leaves
//! the refresh engine except toward the provider, the ledger, or a caller asking for a token.

use crate::secret::Secret;
use chrono::{DateTime, Utc};
use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

/// A wall-clock instant, as stored in the ledger and shown in the API.
pub type Time = DateTime<Utc>;

/// The only provider tokend knows today. Kept as a string in the ledger so that another
/// provider can be added without a migration.
pub const PROVIDER_ATLASSIAN: &str = "atlassian";

/// How many distinct scope lists [`Scopes`] shares at most. Scope lists are few (what the
/// app asks for, and per site what the product grants: a handful per deployment); past this
/// bound a new list is kept unshared, so that a provider answering a new list every time
/// cannot grow the shared set without end.
const SHARED_SCOPE_LISTS_MAX: usize = 1024;

/// Every scope list shared so far (never shrinks: see [`SHARED_SCOPE_LISTS_MAX`]).
static SHARED_SCOPE_LISTS: LazyLock<parking_lot::Mutex<HashSet<Arc<[String]>>>> =
    LazyLock::new(Default::default);

/// A list of OAuth scopes, in the order given, shared by every connection and site that
/// holds the same list: nearly all connections of a deployment hold the same one, and a copy
/// of the list's strings each was about 290 bytes a connection (its scopes and its sites')
/// at the scale bench's 100,000 connections. Immutable: a change makes a new list
/// ([`From<Vec<String>>`]). Reads as a `[String]`.
#[derive(Clone)]
pub struct Scopes(Arc<[String]>);

impl Scopes {
    /// The shared list equal to `list` (made shared if it is not yet, within
    /// [`SHARED_SCOPE_LISTS_MAX`]).
    pub fn new(list: Vec<String>) -> Scopes {
        let mut shared = SHARED_SCOPE_LISTS.lock();
        if let Some(have) = shared.get(&list[..]) {
            return Scopes(have.clone());
        }
        let made: Arc<[String]> = list.into();
        if shared.len() < SHARED_SCOPE_LISTS_MAX {
            shared.insert(made.clone());
        }
        Scopes(made)
    }
}

impl Default for Scopes {
    fn default() -> Self {
        Scopes::new(Vec::new())
    }
}

impl std::ops::Deref for Scopes {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl From<Vec<String>> for Scopes {
    fn from(list: Vec<String>) -> Self {
        Scopes::new(list)
    }
}

impl FromIterator<String> for Scopes {
    fn from_iter<I: IntoIterator<Item = String>>(iter: I) -> Self {
        Scopes::new(iter.into_iter().collect())
    }
}

impl std::fmt::Debug for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl PartialEq for Scopes {
    fn eq(&self, other: &Scopes) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for Scopes {}

impl PartialEq<Vec<String>> for Scopes {
    fn eq(&self, other: &Vec<String>) -> bool {
        *self.0 == other[..]
    }
}

impl PartialEq<[&str]> for Scopes {
    fn eq(&self, other: &[&str]) -> bool {
        self.0.len() == other.len() && self.0.iter().zip(other).all(|(a, b)| a == b)
    }
}

impl<const N: usize> PartialEq<[&str; N]> for Scopes {
    fn eq(&self, other: &[&str; N]) -> bool {
        *self == other[..]
    }
}

/// How many distinct [`SharedStr`] values are shared at most (provider names and OAuth
/// client ids: one or two per deployment); past it a new value is kept unshared.
const SHARED_STRS_MAX: usize = 1024;

/// Every [`SharedStr`] value shared so far (never shrinks: see [`SHARED_STRS_MAX`]).
static SHARED_STRS: LazyLock<parking_lot::Mutex<HashSet<Arc<str>>>> =
    LazyLock::new(Default::default);

/// An immutable string that nearly every connection holds the same value of (the provider,
/// the OAuth client id), shared: one allocation per distinct value, not one per connection
/// (about 100 bytes a connection for the two). Reads as a `str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedStr(Arc<str>);

impl SharedStr {
    /// The shared value equal to `s` (made shared if it is not yet, within
    /// [`SHARED_STRS_MAX`]).
    pub fn new(s: &str) -> SharedStr {
        let mut shared = SHARED_STRS.lock();
        if let Some(have) = shared.get(s) {
            return SharedStr(have.clone());
        }
        let made: Arc<str> = s.into();
        if shared.len() < SHARED_STRS_MAX {
            shared.insert(made.clone());
        }
        SharedStr(made)
    }
}

impl std::ops::Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        SharedStr::new(s)
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        SharedStr::new(&s)
    }
}

impl std::fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

/// Whether a chain can still be refreshed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The chain is alive as far as tokend knows; refreshes are attempted.
    Active,
    /// The provider definitely rejected the chain (`invalid_grant` or `unauthorized_client`):
    /// a person has to consent again. Never retried automatically.
    NeedsReauth,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Status {
    /// The wire and ledger spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::NeedsReauth => "needs_reauth",
        }
    }

    /// Parses the wire and ledger spelling.
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "needs_reauth" => Some(Status::NeedsReauth),
            _ => None,
        }
    }
}

/// The last failure of a connection, as shown to operators. Never contains a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastError {
    /// A stable machine-readable code, e.g. `invalid_grant`, `provider_unavailable`.
    pub code: String,
    /// A sentence for a human.
    pub message: String,
    /// When it happened.
    pub at: Time,
}

/// One Atlassian site (a Jira or Confluence cloud instance) a connection can reach.
///
/// Its strings are `Box<str>`, not `String`: a site never changes in place (a change is a
/// new list of sites), and a `String`'s capacity word is 8 bytes each, 24 a site, for
/// nothing (a site is 80 bytes instead of 104; the scale bench holds 150,000 of them at
/// 100,000 connections).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// The cloud id, used in `https://api.atlassian.com/ex/{product}/{cloud_id}`. Not unique
    /// across products: the same id can be listed once for Jira and once for Confluence.
    pub cloud_id: Box<str>,
    /// `https://acme.atlassian.net`.
    pub url: Box<str>,
    /// The site's display name.
    pub name: Box<str>,
    /// The scopes granted on this site; they tell Jira from Confluence. Shared with every
    /// site of the same scopes.
    pub scopes: Scopes,
    /// When accessible-resources last listed this site.
    pub last_seen_at: Time,
}

impl Site {
    /// The host of the site URL (`acme.atlassian.net`), used by `/v1/token?site=`.
    pub fn host(&self) -> Option<String> {
        url_host(&self.url)
    }

    /// The products this site's scopes give access to (`jira`, `confluence`), sorted.
    pub fn products(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.scopes.iter().any(|s| s.contains("confluence")) {
            out.push("confluence");
        }
        if self
            .scopes
            .iter()
            .any(|s| s.contains("jira") || s.contains("servicedesk") || s.contains("jsm"))
        {
            out.push("jira");
        }
        out
    }
}

/// Whether the host of site URL `url` is `host` (lowercased, as [`url_host`] gives it),
/// without allocating for a plain `https://` host: the check of every `?site=` candidate.
pub fn url_host_is(url: &str, host: &str) -> bool {
    match plain_https_host(url) {
        Some(plain) => plain == host,
        None => url_host(url).is_some_and(|h| h == host),
    }
}

/// The host of a site URL (`acme.atlassian.net`), lowercased: [`Site::host`], for a URL
/// held elsewhere than in a [`Site`] (the engine's packed records).
pub fn url_host(url: &str) -> Option<String> {
    if let Some(host) = plain_https_host(url) {
        return Some(host.to_owned());
    }
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.to_ascii_lowercase()))
}

/// The public face of a connection: everything but its tokens.
#[derive(Clone, Debug)]
pub struct Connection {
    /// Stable id, `c` followed by 12 hex digits; never reused.
    pub id: String,
    /// A unique human name chosen at import (`confluence-prod`).
    pub label: String,
    /// Always [`PROVIDER_ATLASSIAN`] today. Shared with every connection of the provider.
    pub provider: SharedStr,
    /// The OAuth app the chain belongs to: with `account_id`, the chain's identity. Shared
    /// with every connection of the app.
    pub client_id: SharedStr,
    /// The Atlassian account behind the chain; `None` when `/me` is not granted.
    pub account_id: Option<String>,
    /// Whether the chain is alive.
    pub status: Status,
    /// Scopes granted to the chain, from the last token response that listed them. Shared
    /// with every connection of the same scopes.
    pub scopes: Scopes,
    /// Sites the chain reaches, from accessible-resources.
    pub sites: Vec<Site>,
    /// When consent was given (or, for an imported token, when it was imported): the start
    /// of the provider's absolute expiry.
    pub consented_at: Time,
    /// When the last refresh (of any kind) succeeded.
    pub last_refresh_at: Option<Time>,
    /// The last failure, cleared by the next success. Boxed: most connections have none, and
    /// inline it would cost every connection 64 bytes.
    pub last_error: Option<Box<LastError>>,
    /// Failures since the last success; drives the backoff.
    pub consecutive_failures: u32,
    /// When this connection was created in the ledger.
    pub created_at: Time,
    /// When the ledger row last changed.
    pub updated_at: Time,
}

/// The secret half of a connection: the refresh chain and the current access token.
#[derive(Clone, Debug)]
pub struct Chain {
    /// The refresh token to use next. Rotated by every successful refresh.
    pub refresh_token: Secret,
    /// When `refresh_token` was obtained.
    pub rotated_at: Time,
    /// When `refresh_token` was last used successfully (obtained, or presented and answered
    /// without a rotation): the start of its inactivity expiry and of `rotate_after`.
    pub used_at: Time,
    /// Grows by one with every committed change of the chain: the store's compare-and-swap
    /// key, so that a stale writer can never replace a newer chain.
    pub version: u64,
    /// The token that `refresh_token` replaced and when, kept for the provider's reuse
    /// leeway: within it, the previous token may be presented again to recover from a lost
    /// response. Never used outside the leeway. Boxed: held only for minutes after a
    /// rotation, and inline it would cost every chain 40 bytes.
    pub previous: Option<Box<(Secret, Time)>>,
    /// Set (durably) before a refresh request is sent with `refresh_token`, cleared when the
    /// outcome is known. If set at startup, the daemon died or lost the answer while the
    /// provider may already have rotated the token: retry at once, inside the leeway.
    pub attempt_started_at: Option<Time>,
    /// The current access token and when it expires.
    pub access: Option<AccessToken>,
}

/// An access token and its expiry.
#[derive(Clone, Debug)]
pub struct AccessToken {
    /// The bearer token handed to services.
    pub token: Secret,
    /// When it expires. When the provider did not say, tokend assumes
    /// [`crate::provider::ASSUMED_ACCESS_LIFETIME`].
    pub expires_at: Time,
}

/// A connection with its chain, as the refresh engine and the ledger hold it.
#[derive(Clone, Debug)]
pub struct Record {
    /// The public face.
    pub conn: Connection,
    /// The secrets.
    pub chain: Chain,
}

impl Record {
    /// Takes over the chain of `from` and every field a chain commit writes (the store's
    /// chain columns), leaving identity, account and sites alone: what memory must do after
    /// the store committed `from`'s chain.
    pub fn adopt_chain(&mut self, from: &Record) {
        self.chain = from.chain.clone();
        let (c, f) = (&mut self.conn, &from.conn);
        c.status = f.status;
        c.scopes = f.scopes.clone();
        c.consented_at = f.consented_at;
        c.last_refresh_at = f.last_refresh_at;
        c.last_error = f.last_error.clone();
        c.consecutive_failures = f.consecutive_failures;
        c.updated_at = f.updated_at;
    }
}

/// The periodic jobs (`[jobs]`). Their names are the config keys, the `cron_job` metric
/// label and health's `stalled_jobs`: spelled once, in [`JobKind::name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// Re-read accessible-resources of every active connection.
    ResolveSites,
    /// Prune old events, checkpoint the WAL.
    Maintenance,
}

impl JobKind {
    /// Every job.
    pub const ALL: [JobKind; 2] = [JobKind::ResolveSites, JobKind::Maintenance];

    /// The job's name in config, logs, health and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            JobKind::ResolveSites => "resolve_sites",
            JobKind::Maintenance => "maintenance",
        }
    }
}

/// The local process an event concerns (a token read): from SO_PEERCRED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventPeer {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's pid, when the kernel said.
    pub pid: Option<u32>,
}

/// What an [`Event`] records. The ledger, the API and the CLI spell it with
/// [`EventKind::as_str`].
///
/// **Fallback:** a kind this build does not know (a row written by a newer daemon, or an
/// older one's retired kind) is read as [`EventKind::Other`] holding the stored text
/// unchanged, so the history still loads and is shown (and written back) as it was stored.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A connection was added (import or consent).
    Imported,
    /// The refresh token was rotated.
    Rotated,
    /// A refresh succeeded without a new refresh token.
    Refreshed,
    /// A refresh failed.
    Failed,
    /// The status changed (`active -> needs_reauth`).
    StatusChanged,
    /// accessible-resources listed a new site.
    SiteAdded,
    /// A known site's scopes changed.
    SiteScopesChanged,
    /// accessible-resources no longer lists a site.
    SiteRemoved,
    /// `/me` named the chain's account.
    AccountResolved,
    /// Another connection of the same account was merged into this one.
    Merged,
    /// The connection was removed.
    Removed,
    /// A chain that had failed works again.
    Recovered,
    /// Token reads (folded per uid and minute).
    TokenRead,
    /// Refused token reads (folded per uid and minute).
    TokenRefused,
    /// A kind this build does not know, kept as stored (see the type's doc).
    Other(String),
}

impl EventKind {
    /// Every kind this build writes, for tests and documentation.
    pub const KNOWN: [EventKind; 14] = [
        EventKind::Imported,
        EventKind::Rotated,
        EventKind::Refreshed,
        EventKind::Failed,
        EventKind::StatusChanged,
        EventKind::SiteAdded,
        EventKind::SiteScopesChanged,
        EventKind::SiteRemoved,
        EventKind::AccountResolved,
        EventKind::Merged,
        EventKind::Removed,
        EventKind::Recovered,
        EventKind::TokenRead,
        EventKind::TokenRefused,
    ];

    /// The ledger, API and CLI spelling.
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::Imported => "imported",
            EventKind::Rotated => "rotated",
            EventKind::Refreshed => "refreshed",
            EventKind::Failed => "failed",
            EventKind::StatusChanged => "status_changed",
            EventKind::SiteAdded => "site_added",
            EventKind::SiteScopesChanged => "site_scopes_changed",
            EventKind::SiteRemoved => "site_removed",
            EventKind::AccountResolved => "account_resolved",
            EventKind::Merged => "merged",
            EventKind::Removed => "removed",
            EventKind::Recovered => "recovered",
            EventKind::TokenRead => "token_read",
            EventKind::TokenRefused => "token_refused",
            EventKind::Other(s) => s,
        }
    }

    /// Parses a stored or wire spelling; never fails (unknown text is [`EventKind::Other`]).
    pub fn parse(s: &str) -> EventKind {
        EventKind::KNOWN
            .iter()
            .find(|k| k.as_str() == s)
            .cloned()
            .unwrap_or_else(|| EventKind::Other(s.to_owned()))
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line of the append-only history. Never carries a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// A sentence for a human.
    pub message: String,
    /// Who caused it, for token reads.
    pub peer: Option<EventPeer>,
    /// How many occurrences it folds (token reads of one uid in one minute), else 1.
    pub count: u32,
}

impl Event {
    /// Builds an event.
    pub fn new(kind: EventKind, message: impl Into<String>) -> Event {
        Event {
            kind,
            message: message.into(),
            peer: None,
            count: 1,
        }
    }
}

/// An event as the ledger holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// When it happened (for folded reads: the first of them).
    pub at: Time,
    /// See [`Event::kind`].
    pub kind: EventKind,
    /// See [`Event::message`].
    pub message: String,
    /// The daemon that recorded it (`daemon.node_name`), when known.
    pub node: Option<String>,
    /// See [`Event::peer`].
    pub peer: Option<EventPeer>,
    /// See [`Event::count`].
    pub count: u32,
}

/// A fresh random connection id.
pub fn new_connection_id() -> String {
    use rand::Rng;
    #[cfg(test)]
    if let Some(n) = seeded(|r| r.random::<u64>()) {
        return format!("c{:012x}", n & 0xffff_ffff_ffff);
    }
    let n: u64 = rand::rng().random();
    format!("c{:012x}", n & 0xffff_ffff_ffff)
}

#[cfg(test)]
thread_local! {
    /// A seeded generator for this thread (the deterministic simulation), if set: connection
    /// ids and backoff jitter come from it, so that a run replays exactly.
    static SEEDED: std::cell::RefCell<Option<rand::rngs::StdRng>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes this thread's ids and jitter come from `seed` (or from the OS again with `None`).
#[cfg(test)]
pub(crate) fn seed_this_thread(seed: Option<u64>) {
    use rand::SeedableRng;
    SEEDED.with(|s| *s.borrow_mut() = seed.map(rand::rngs::StdRng::seed_from_u64));
}

/// Draws from this thread's seeded generator, if one is set.
#[cfg(test)]
pub(crate) fn seeded<R>(draw: impl FnOnce(&mut rand::rngs::StdRng) -> R) -> Option<R> {
    SEEDED.with(|s| s.borrow_mut().as_mut().map(draw))
}

/// A plain active record for unit tests: account `acct-{id}`, no sites, no access token.
/// The host of `https://HOST` or `https://HOST/...` when HOST is a plain lowercase DNS name
/// (letters, digits, hyphens, dots between non-empty labels, the last label starting with a
/// letter, no `xn--` label), as every Atlassian site URL is: exactly what `url` would parse
/// out of it, without the parse (at start-up, `url` was 5% of a 100,000-connection load).
/// `None` for anything else, which `url` parses.
fn plain_https_host(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://")?;
    let host = rest.find('/').map_or(rest, |end| &rest[..end]);
    let plain = |label: &str| {
        !label.is_empty()
            && !label.starts_with("xn--")
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let last = host.rsplit('.').next()?;
    (host.split('.').all(plain) && last.starts_with(|c: char| c.is_ascii_lowercase()))
        .then_some(host)
}

#[cfg(test)]
pub(crate) fn sample_record(id: &str, label: &str, refresh_token: &str, at: Time) -> Record {
    Record {
        conn: Connection {
            id: id.into(),
            label: label.into(),
            provider: PROVIDER_ATLASSIAN.into(),
            client_id: "client".into(),
            account_id: Some(format!("acct-{id}")),
            status: Status::Active,
            scopes: vec!["offline_access".into(), "read:page:confluence".into()].into(),
            sites: Vec::new(),
            consented_at: at,
            last_refresh_at: None,
            last_error: None,
            consecutive_failures: 0,
            created_at: at,
            updated_at: at,
        },
        chain: Chain {
            refresh_token: Secret::new(refresh_token),
            rotated_at: at,
            used_at: at,
            version: 0,
            previous: None,
            attempt_started_at: None,
            access: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Equal scope lists made apart share one allocation; different ones do not; the order
    /// is kept and the list compares with plain lists.
    #[test]
    fn equal_scope_lists_are_shared() {
        let a = Scopes::from(vec!["offline_access".to_owned(), "read:me".to_owned()]);
        let b: Scopes = ["offline_access", "read:me"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(Arc::ptr_eq(&a.0, &b.0), "one list for both");
        let c = Scopes::from(vec!["read:me".to_owned(), "offline_access".to_owned()]);
        assert!(!Arc::ptr_eq(&a.0, &c.0));
        assert_ne!(a, c, "order is kept");
        assert_eq!(a, ["offline_access", "read:me"]);
        assert_eq!(a, vec!["offline_access".to_owned(), "read:me".to_owned()]);
        assert_eq!(format!("{a:?}"), r#"["offline_access", "read:me"]"#);
        assert!(Scopes::default().is_empty());
    }

    fn by_url(url: &str) -> Option<String> {
        url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.to_ascii_lowercase()))
    }

    fn site(url: &str) -> Site {
        Site {
            cloud_id: "c".into(),
            url: url.into(),
            name: "n".into(),
            scopes: Scopes::default(),
            last_seen_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_site_host_is_what_url_parses_out_of_it() {
        for url in [
            "https://acme.atlassian.net",
            "https://acme.atlassian.net/",
            "https://acme.atlassian.net/wiki?x=1#y",
            "https://Acme.Atlassian.NET",
            "https://acme.atlassian.net:443/",
            "https://acme.atlassian.net:8443",
            "https://user@acme.atlassian.net",
            "https://acme.atlassian.net.",
            "https://a..b",
            "https://127.0.0.1",
            "https://1.2.3.4.5",
            "https://0x7f.1",
            "https://acme.123",
            "https://xn--nxasmq6b.com",
            "https://xn--zz.com",
            "https://-acme-.net",
            "https://acme.net?q",
            "https://acme.net\\path",
            "https://ac\tme.net",
            " https://acme.net",
            "https://acme.net ",
            "http://acme.net",
            "https:///acme.net",
            "https://",
            "https://[::1]/",
            "acme.atlassian.net",
            "",
        ] {
            assert_eq!(site(url).host(), by_url(url), "{url:?}");
        }
        assert_eq!(
            plain_https_host("https://acme.atlassian.net/wiki"),
            Some("acme.atlassian.net"),
            "an Atlassian site URL takes the fast path"
        );
    }

    proptest! {
        #[test]
        fn any_site_host_is_what_url_parses_out_of_it(
            rest in "[a-zA-Z0-9.:/@%?#\\\\\t -]{0,24}",
            scheme in prop::sample::select(vec!["https://", "http://", "HTTPS://", "https:/", ""]),
        ) {
            let url = format!("{scheme}{rest}");
            prop_assert_eq!(site(&url).host(), by_url(&url), "{:?}", url);
        }

        #[test]
        fn url_host_is_agrees_with_the_host(
            rest in "[a-zA-Z0-9.:/@%?#\\	 -]{0,24}",
            scheme in prop::sample::select(vec!["https://", "http://", "HTTPS://", ""]),
            other in "[a-z0-9.-]{0,12}",
        ) {
            let url = format!("{scheme}{rest}");
            let host = url_host(&url);
            if let Some(h) = &host {
                prop_assert!(url_host_is(&url, h), "{:?} is on {:?}", url, h);
            }
            prop_assert_eq!(url_host_is(&url, &other), host.as_deref() == Some(&*other), "{:?} against {:?}", url, other);
        }
    }
}
