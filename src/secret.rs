//! A string that must never be printed: refresh tokens, access tokens, client secrets.
//!
//! `Secret` has no `Display`, no `Serialize`, and a `Debug` that prints `[redacted]`, so a
//! secret cannot reach a log line, an error body or a panic message by accident. Reading the
//! value takes an explicit [`Secret::expose`], which is easy to grep for in review.
//!
//! **Architecture Invariant:** every token or secret in tokend's memory is a `Secret` until
//! the instant it is written to the wire, the ledger, or a caller that asked for it.

use std::fmt;

/// A secret string. Compare with [`Secret::expose`]; there is deliberately no `PartialEq`
/// so that secrets are not compared (and timed) casually. A `Box<str>`, not a `String`: a
/// secret never grows, and every chain in memory holds two or three (16 bytes each, not 24).
#[derive(Clone)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a value that must never be printed.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(boxed(value.into()))
    }

    /// The raw value, for the wire, the ledger, or the caller who asked for a token.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is the empty string (an unset credential).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    /// Wipes the value: a freed token does not linger in memory (or a swapped-out page).
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(boxed(value))
    }
}

/// `value` as a `Box<str>` without leaving a copy behind: a string with spare room would be
/// shrunk by `into_boxed_str`, whose reallocation may move it and free the old bytes
/// unwiped, so it is copied into an exact allocation and wiped instead.
fn boxed(mut value: String) -> Box<str> {
    if value.len() == value.capacity() {
        return value.into_boxed_str();
    }
    use zeroize::Zeroize;
    let exact: Box<str> = value.as_str().into();
    value.zeroize();
    exact
}

/// Marks the process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`): no core dump, and no
/// ptrace or `/proc/<pid>/mem` access for other processes of the same user, so tokens in
/// memory stay in the process.
pub fn forbid_core_dumps() {
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "cannot mark the process non-dumpable; a core dump could hold tokens");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_is_marked_non_dumpable() {
        forbid_core_dumps();
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }

    #[test]
    fn a_secret_keeps_its_value_with_or_without_spare_room() {
        let mut roomy = String::with_capacity(64);
        roomy.push_str("at-roomy");
        assert_eq!(Secret::from(roomy).expose(), "at-roomy");
        assert_eq!(Secret::new("exact".to_owned()).expose(), "exact");
        assert!(Secret::new(String::new()).is_empty());
    }

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("rt-super-secret");
        let printed = format!("{s:?} {:?}", Some(s.clone()));
        assert!(!printed.contains("super-secret"), "{printed}");
        assert_eq!(s.expose(), "rt-super-secret");
    }
}
