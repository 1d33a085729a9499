//! The pure rules of the fake: the token-chain state machine, with no HTTP in it.
//!
//! Rotating refresh tokens follow the Auth0 rules Atlassian documents: every exchange of the
//! family's current token rotates it; the token it replaced (its *parent*) may be exchanged
//! again within the leeway, which issues a fresh pair that becomes current; using any other
//! non-current token of the family (or the parent after the leeway) revokes the whole
//! family. A current token unused for longer than the inactivity expiry is refused without
//! revoking the family. Access tokens die with their family, when they expire, and `leeway`
//! after their companion refresh token was rotated. The clock is real time plus a skew that
//! tests move forward.
//!
//! [`Chains::refresh`] and [`Chains::exchange_code`] decide a grant and return a
//! [`Decision`]; the HTTP shell (`http.rs`) turns it into an answer.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::Rng;

use super::{
    CLIENT_SECRET, CODE_LIFETIME, DEFAULT_ACCESS_LIFETIME, DEFAULT_INACTIVITY_EXPIRY,
    DEFAULT_LEEWAY, FakeSite, IssuedSecret, Outcome, SecretKind,
};

#[derive(Debug)]
/// One refresh token ever issued.
pub(super) struct RefreshEntry {
    account: String,
    epoch: u64,
    /// The token this one was issued in exchange for.
    parent: Option<String>,
    issued_at: Instant,
    /// When this token stopped being current (rotated or superseded by a leeway reuse).
    rotated_at: Option<Instant>,
}

#[derive(Debug)]
/// One access token ever issued, tied to the refresh token it came with.
pub(super) struct AccessEntry {
    account: String,
    epoch: u64,
    companion: String,
    expires_at: Option<Instant>,
}

#[derive(Debug)]
/// One authorization code minted by a test.
pub(super) struct CodeEntry {
    account: String,
    sites: Vec<FakeSite>,
    redirect_uri: String,
    issued_at: Instant,
    used: bool,
}

#[derive(Debug)]
/// The token family of one account: one consent and every rotation since.
pub(super) struct Family {
    pub(super) epoch: u64,
    pub(super) alive: bool,
    pub(super) current: String,
    pub(super) sites: Vec<FakeSite>,
}

#[derive(Debug, Default, Clone, Copy)]
/// What one account's refresh grants did.
pub(super) struct AccountStats {
    pub(super) successful_refreshes: usize,
    pub(super) rotations: usize,
}

/// Every token, code and family the fake knows, and its clock and rules' settings.
#[derive(Debug)]
pub(super) struct Chains {
    /// How far the fake's clock is ahead of real time ([`super::FakeAtlassian::advance`]).
    pub(super) skew: Duration,
    /// How long the parent of the current token may be presented again.
    pub(super) leeway: Duration,
    /// How long the current token may go unused.
    pub(super) inactivity_expiry: Duration,
    /// Lifetime of access tokens minted from now on; `None`: they never expire by time.
    pub(super) access_lifetime: Option<Duration>,
    /// The epoch of the next family (a family's tokens carry it).
    pub(super) next_epoch: u64,
    pub(super) families: HashMap<String, Family>,
    pub(super) refresh_tokens: HashMap<String, RefreshEntry>,
    pub(super) access_tokens: HashMap<String, AccessEntry>,
    pub(super) codes: HashMap<String, CodeEntry>,
    /// Accounts whose consent lacks `read:me` (`/me` answers 403).
    pub(super) hidden: HashSet<String>,
    pub(super) stats: HashMap<String, AccountStats>,
    pub(super) leeway_reuses: usize,
    pub(super) reuse_violations: usize,
    /// Every secret handed out, for the scans of the daemon's output.
    pub(super) secrets: Vec<IssuedSecret>,
    /// How many secrets of each kind each account was handed so far: the next one's
    /// ordinal without a scan of `secrets` (which would make a benchmark's 10,000 chains
    /// cost quadratic time under the lock).
    pub(super) issued_counts: HashMap<(SecretKind, String), usize>,
}

/// What the rules made of one grant.
#[derive(Debug)]
pub(super) struct Decision {
    pub(super) outcome: Outcome,
    /// The account the grant concerned, when known.
    pub(super) account: Option<String>,
    /// The tokens issued, when the grant succeeded.
    pub(super) issued: Option<Issued>,
}

/// Tokens issued by a successful grant.
#[derive(Debug)]
pub(super) struct Issued {
    pub(super) access_token: String,
    /// `None` when the grant did not rotate ([`super::Fault::OmitRefreshToken`]).
    pub(super) refresh_token: Option<String>,
}

impl Decision {
    fn refused(outcome: Outcome, account: Option<String>) -> Decision {
        Decision {
            outcome,
            account,
            issued: None,
        }
    }
}

impl Chains {
    pub(super) fn new() -> Chains {
        Chains {
            skew: Duration::ZERO,
            leeway: DEFAULT_LEEWAY,
            inactivity_expiry: DEFAULT_INACTIVITY_EXPIRY,
            access_lifetime: Some(DEFAULT_ACCESS_LIFETIME),
            next_epoch: 1,
            families: HashMap::new(),
            refresh_tokens: HashMap::new(),
            access_tokens: HashMap::new(),
            codes: HashMap::new(),
            hidden: HashSet::new(),
            stats: HashMap::new(),
            leeway_reuses: 0,
            reuse_violations: 0,
            secrets: vec![IssuedSecret {
                kind: SecretKind::ClientSecret,
                account: None,
                ordinal: 1,
                value: CLIENT_SECRET.to_string(),
            }],
            issued_counts: HashMap::new(),
        }
    }

    pub(super) fn now(&self) -> Instant {
        Instant::now() + self.skew
    }

    pub(super) fn remember(&mut self, kind: SecretKind, account: &str, value: &str) {
        let count = self
            .issued_counts
            .entry((kind, account.to_string()))
            .or_default();
        *count += 1;
        let ordinal = *count;
        self.secrets.push(IssuedSecret {
            kind,
            account: Some(account.to_string()),
            ordinal,
            value: value.to_string(),
        });
    }

    pub(super) fn mint_refresh(
        &mut self,
        account: &str,
        epoch: u64,
        parent: Option<String>,
    ) -> String {
        let rt = random_token("rt-");
        let issued_at = self.now();
        self.refresh_tokens.insert(
            rt.clone(),
            RefreshEntry {
                account: account.to_string(),
                epoch,
                parent,
                issued_at,
                rotated_at: None,
            },
        );
        self.remember(SecretKind::RefreshToken, account, &rt);
        rt
    }

    pub(super) fn mint_access(&mut self, account: &str, epoch: u64, companion: &str) -> String {
        let at = random_token("at-");
        let expires_at = self.access_lifetime.map(|d| self.now() + d);
        self.access_tokens.insert(
            at.clone(),
            AccessEntry {
                account: account.to_string(),
                epoch,
                companion: companion.to_string(),
                expires_at,
            },
        );
        self.remember(SecretKind::AccessToken, account, &at);
        at
    }

    /// Replace (or create) the family of `account` with a new one whose first refresh token
    /// is returned.
    pub(super) fn new_family(&mut self, account: &str, sites: Vec<FakeSite>) -> String {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let rt = self.mint_refresh(account, epoch, None);
        self.families.insert(
            account.to_string(),
            Family {
                epoch,
                alive: true,
                current: rt.clone(),
                sites,
            },
        );
        rt
    }

    pub(super) fn scope_of(&self, account: &str) -> String {
        let mut scopes: Vec<String> = vec!["offline_access".to_string()];
        if !self.hidden.contains(account) {
            scopes.push("read:me".to_string());
        }
        if let Some(f) = self.families.get(account) {
            for site in &f.sites {
                for s in &site.scopes {
                    if !scopes.contains(s) {
                        scopes.push(s.clone());
                    }
                }
            }
        }
        scopes.join(" ")
    }

    /// The account of a valid access token.
    pub(super) fn check_access(&self, token: &str) -> Option<String> {
        let entry = self.access_tokens.get(token)?;
        let family = self.families.get(&entry.account)?;
        if !family.alive || family.epoch != entry.epoch {
            return None;
        }
        let now = self.now();
        if entry.expires_at.is_some_and(|e| now >= e) {
            return None;
        }
        let companion = self.refresh_tokens.get(&entry.companion)?;
        if companion.rotated_at.is_some_and(|r| now >= r + self.leeway) {
            return None;
        }
        Some(entry.account.clone())
    }

    /// Mints a single-use authorization code (valid [`CODE_LIFETIME`]) for `redirect_uri`.
    pub(super) fn issue_code(
        &mut self,
        account: &str,
        sites: &[FakeSite],
        redirect_uri: &str,
    ) -> String {
        let code = random_token("code-");
        let issued_at = self.now();
        self.codes.insert(
            code.clone(),
            CodeEntry {
                account: account.to_string(),
                sites: sites.to_vec(),
                redirect_uri: redirect_uri.to_string(),
                issued_at,
                used: false,
            },
        );
        self.remember(SecretKind::AuthorizationCode, account, &code);
        code
    }

    /// The refresh grant of `rt`. `rotate` is false for an answer without a new refresh
    /// token ([`super::Fault::OmitRefreshToken`]): the presented token stays current.
    pub(super) fn refresh(&mut self, rt: &str, rotate: bool) -> Decision {
        let now = self.now();
        let Some(tok) = self.refresh_tokens.get(rt) else {
            return Decision::refused(Outcome::UnknownToken, None);
        };
        let account = tok.account.clone();
        let epoch = tok.epoch;
        let issued_at = tok.issued_at;
        let rotated_at = tok.rotated_at;
        let refused = |outcome| Decision::refused(outcome, Some(account.clone()));
        let Some(family) = self.families.get(&account) else {
            return refused(Outcome::UnknownToken);
        };
        if family.epoch != epoch {
            return refused(Outcome::Superseded);
        }
        if !family.alive {
            return refused(Outcome::FamilyRevoked);
        }
        let current = family.current.clone();
        let outcome = if current == rt {
            if now.duration_since(issued_at) > self.inactivity_expiry {
                return refused(Outcome::Expired);
            }
            Outcome::Refreshed
        } else {
            let parent_of_current = self
                .refresh_tokens
                .get(&current)
                .and_then(|c| c.parent.clone());
            let within_leeway = rotated_at.is_some_and(|r| now < r + self.leeway);
            if parent_of_current.as_deref() != Some(rt) || !within_leeway {
                // Reuse outside the leeway, or of an older token: breach detection.
                if let Some(f) = self.families.get_mut(&account) {
                    f.alive = false;
                }
                self.reuse_violations += 1;
                return refused(Outcome::ReuseViolation);
            }
            self.leeway_reuses += 1;
            Outcome::LeewayReuse
        };
        self.stats
            .entry(account.clone())
            .or_default()
            .successful_refreshes += 1;
        let issued = if rotate {
            // The token now current stops being current (the presented one, or the one
            // that replaced it, on a leeway reuse).
            if let Some(t) = self.refresh_tokens.get_mut(&current) {
                t.rotated_at = Some(now);
            }
            let new_rt = self.mint_refresh(&account, epoch, Some(rt.to_string()));
            let at = self.mint_access(&account, epoch, &new_rt);
            if let Some(f) = self.families.get_mut(&account) {
                f.current = new_rt.clone();
            }
            self.stats.entry(account.clone()).or_default().rotations += 1;
            Issued {
                access_token: at,
                refresh_token: Some(new_rt),
            }
        } else {
            // The fresh access token is tied to the token now current.
            let at = self.mint_access(&account, epoch, &current);
            Issued {
                access_token: at,
                refresh_token: None,
            }
        };
        Decision {
            outcome,
            account: Some(account),
            issued: Some(issued),
        }
    }

    /// The authorization-code grant: a valid, unused, unexpired code for `redirect_uri`
    /// creates (or replaces) the account's family and issues its first pair.
    pub(super) fn exchange_code(&mut self, code: &str, redirect_uri: &str) -> Decision {
        let now = self.now();
        let Some(c) = self.codes.get_mut(code) else {
            return Decision::refused(Outcome::BadCode, None);
        };
        let account = c.account.clone();
        if c.used
            || c.redirect_uri != redirect_uri
            || now.duration_since(c.issued_at) >= CODE_LIFETIME
        {
            return Decision::refused(Outcome::BadCode, Some(account));
        }
        c.used = true;
        let sites = c.sites.clone();
        let rt = self.new_family(&account, sites);
        let epoch = self.families.get(&account).map_or(0, |f| f.epoch);
        let at = self.mint_access(&account, epoch, &rt);
        Decision {
            outcome: Outcome::CodeExchanged,
            account: Some(account),
            issued: Some(Issued {
                access_token: at,
                refresh_token: Some(rt),
            }),
        }
    }
}

fn random_token(prefix: &str) -> String {
    let rest: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    format!("{prefix}{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "acct-rules";

    fn rotated(d: &Decision) -> String {
        d.issued
            .as_ref()
            .and_then(|i| i.refresh_token.clone())
            .unwrap_or_else(|| panic!("no new refresh token: {d:?}"))
    }

    #[test]
    fn the_current_token_rotates_and_its_access_token_lives_until_the_leeway_ends() {
        let mut c = Chains::new();
        let rt0 = c.new_family(ACCOUNT, vec![]);
        let d = c.refresh(&rt0, true);
        assert_eq!(d.outcome, Outcome::Refreshed);
        let rt1 = rotated(&d);
        assert_eq!(c.families[ACCOUNT].current, rt1);
        let at1 = d.issued.unwrap().access_token;
        assert_eq!(c.check_access(&at1).as_deref(), Some(ACCOUNT));
        // Rotating rt1 leaves at1 good for the leeway, then not.
        let rt2 = rotated(&c.refresh(&rt1, true));
        assert_eq!(c.check_access(&at1).as_deref(), Some(ACCOUNT));
        c.skew += c.leeway;
        assert_eq!(c.check_access(&at1), None);
        assert_eq!(c.families[ACCOUNT].current, rt2);
        assert_eq!(c.stats[ACCOUNT].rotations, 2);
    }

    #[test]
    fn the_parent_is_reusable_inside_the_leeway_and_revokes_the_family_after() {
        let mut c = Chains::new();
        let rt0 = c.new_family(ACCOUNT, vec![]);
        let rt1 = rotated(&c.refresh(&rt0, true));
        let d = c.refresh(&rt0, true);
        assert_eq!(d.outcome, Outcome::LeewayReuse);
        let rt2 = rotated(&d);
        assert_ne!(rt2, rt1);
        assert_eq!(c.families[ACCOUNT].current, rt2);
        assert_eq!(c.leeway_reuses, 1);
        // The replaced rt1 is now neither current nor the parent: a breach.
        assert_eq!(c.refresh(&rt1, true).outcome, Outcome::ReuseViolation);
        assert!(!c.families[ACCOUNT].alive);
        assert_eq!(c.refresh(&rt2, true).outcome, Outcome::FamilyRevoked);

        let mut c = Chains::new();
        let rt0 = c.new_family(ACCOUNT, vec![]);
        let _rt1 = rotated(&c.refresh(&rt0, true));
        c.skew += c.leeway;
        assert_eq!(c.refresh(&rt0, true).outcome, Outcome::ReuseViolation);
        assert_eq!(c.reuse_violations, 1);
    }

    #[test]
    fn an_unused_current_token_expires_without_revoking_the_family() {
        let mut c = Chains::new();
        let rt0 = c.new_family(ACCOUNT, vec![]);
        c.skew += c.inactivity_expiry + Duration::from_secs(1);
        assert_eq!(c.refresh(&rt0, true).outcome, Outcome::Expired);
        assert!(c.families[ACCOUNT].alive);
    }

    #[test]
    fn an_answer_without_rotation_keeps_the_presented_token_current() {
        let mut c = Chains::new();
        let rt0 = c.new_family(ACCOUNT, vec![]);
        let d = c.refresh(&rt0, false);
        assert_eq!(d.outcome, Outcome::Refreshed);
        assert_eq!(d.issued.as_ref().unwrap().refresh_token, None);
        assert_eq!(c.families[ACCOUNT].current, rt0);
        assert_eq!(c.refresh(&rt0, true).outcome, Outcome::Refreshed);
    }

    #[test]
    fn a_code_is_single_use_and_bound_to_its_redirect() {
        let mut c = Chains::new();
        let code = c.issue_code(ACCOUNT, &[], "http://cb");
        assert_eq!(
            c.exchange_code(&code, "http://other").outcome,
            Outcome::BadCode
        );
        let d = c.exchange_code(&code, "http://cb");
        assert_eq!(d.outcome, Outcome::CodeExchanged);
        assert_eq!(c.families[ACCOUNT].current, rotated(&d));
        assert_eq!(
            c.exchange_code(&code, "http://cb").outcome,
            Outcome::BadCode
        );
        let late = c.issue_code(ACCOUNT, &[], "http://cb");
        c.skew += CODE_LIFETIME;
        assert_eq!(
            c.exchange_code(&late, "http://cb").outcome,
            Outcome::BadCode
        );
    }
}
