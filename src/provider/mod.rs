//! The Atlassian client: the only module that knows Atlassian's endpoints and answers.
//!
//! It speaks to three endpoints: the token endpoint (`refresh_token` and
//! `authorization_code` grants, JSON bodies with the client id and secret in the body, as
//! Atlassian documents), `oauth/token/accessible-resources` (which sites a token reaches) and
//! `/me` (which account it belongs to). Every answer is turned into a typed outcome; every
//! failure is classified once, here, as [`ProviderError::Rejected`] (the chain is dead) or
//! [`ProviderError::Transient`] (try again later), so that no other module has to guess.
//!
//! The `oauth2` crate builds the authorize URL and its `state`; the token requests are made
//! with reqwest directly because the classification needs the HTTP status and `Retry-After`,
//! which `oauth2`'s error type drops, and because `oauth2` sends form bodies while Atlassian
//! documents JSON. `oauth2`'s errors are never formatted: their `Debug` prints raw bodies,
//! tokens included.
//!
//! **Architecture Invariant:** nothing this module returns or logs contains a token or the
//! client secret; provider texts are cut short and scrubbed of the token that was sent.
//!
//! Files: `client` (the HTTP client: requests, the authorize URL), `gate` (the
//! `Retry-After` gate: one pause per endpoint for every connection, then one probe) and
//! `classify` (every answer and transport failure into a [`Grant`], an [`Account`], sites or
//! a [`ProviderError`]; the one place that decides what condemns a chain).

use std::time::Duration;

use crate::secret::Secret;

mod classify;
mod client;
mod gate;

#[cfg(test)]
mod props;

pub use classify::{ProviderError, TransientKind};
pub use client::{Atlassian, new_state};

/// What tokend assumes an access token lives when the provider does not send `expires_in`.
/// Atlassian documents one hour; assuming exactly that would hand out tokens that expire
/// the moment the assumption is slightly off, so take a little less.
pub const ASSUMED_ACCESS_LIFETIME: Duration = Duration::from_secs(50 * 60);

/// Atlassian's reuse leeway: a rotated refresh token may be presented again for this long
/// (to recover from a lost answer) before the provider treats it as a breach and revokes the
/// whole chain.
pub const REUSE_LEEWAY: Duration = Duration::from_secs(10 * 60);

/// How much of [`REUSE_LEEWAY`] tokend leaves unused as a safety margin for clock skew and
/// request latency: it never presents an old token later than `LEEWAY - this`.
pub const LEEWAY_SAFETY_MARGIN: Duration = Duration::from_secs(90);

/// Tokens obtained from the token endpoint.
#[derive(Debug)]
pub struct Grant {
    /// The new access token.
    pub access_token: Secret,
    /// The new refresh token; `None` when the provider did not send one (keep the old one).
    pub refresh_token: Option<Secret>,
    /// The access token's lifetime, when the provider said.
    pub expires_in: Option<Duration>,
    /// Granted scopes, when the provider listed them.
    pub scopes: Option<Vec<String>>,
}

/// The account behind a token, from `/me`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The Atlassian account id.
    pub account_id: String,
}

/// Tests only: a 200 answer of the token endpoint through the real parser, for the store
/// semantics tests that check what the provider boundary lets through can be stored.
#[cfg(test)]
pub fn parse_token_answer(body: &[u8]) -> Result<Grant, ProviderError> {
    classify::parse_grant(reqwest::StatusCode::OK, body)
}

/// Tests only: a 200 answer of accessible-resources through the real parser (see
/// [`parse_token_answer`]).
#[cfg(test)]
pub fn parse_sites_answer(
    body: &[u8],
    now: crate::model::Time,
) -> Result<Vec<crate::model::Site>, ProviderError> {
    classify::parse_resources(reqwest::StatusCode::OK, None, body, now)
}
