//! Tokens at rest: every token column of the ledger is sealed with XChaCha20-Poly1305.
//!
//! A sealed value is `s1:` followed by base64 of a random 24-byte nonce and the ciphertext.
//! The associated data names the connection and the column (`tokend:<id>:<column>`), so a
//! value copied to another row or column fails to open. The key is 32 bytes, kept as 64 hex
//! digits in `daemon.key_file` (by default `<state_dir>/ledger.key`, created 0600 on first
//! start); `daemon.old_key_files` hold keys that still open values, for rotation.
//!
//! **Architecture Invariant:** a key never leaves this module, and is wiped from memory when
//! dropped.
//!
//! Public outside the library: [`KeySource`], [`Keyring::load`], [`Keyring::seal`],
//! [`Keyring::open`] (and the [`Opened`] and [`KeyError`] they answer) and [`aad`], because
//! the integration tests and the outside bench read and write sealed columns of a ledger
//! beside the daemon (`tests/it/util/ledger.rs`, `tests/it/migrate.rs`,
//! `benches/outside/seed.rs`, `benches/outside/storm.rs`); the rest is `pub(crate)`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// What marks a sealed value (format version 1).
const PREFIX: &str = "s1:";

/// The name of the key file tokend creates when `daemon.key_file` is not set.
pub(crate) const DEFAULT_KEY_FILE: &str = "ledger.key";

/// The nonce length of XChaCha20: large enough to draw at random for every value.
const NONCE_LEN: usize = 24;

/// Poly1305's tag, after the ciphertext.
const TAG_LEN: usize = 16;

/// The key check value's plaintext: opening it proves the key is the ledger's.
const CHECK_PLAINTEXT: &str = "tokend ledger key check";

/// Why the keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or created.
    #[error("cannot use the key file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong (never the key).
        reason: String,
    },
}

/// Where the keys come from (`daemon.key_file`, `daemon.old_key_files`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySource {
    /// The key that seals; `None` for `<state_dir>/ledger.key`, created on first start.
    pub key_file: Option<PathBuf>,
    /// Keys that still open values sealed before a rotation.
    pub old_key_files: Vec<PathBuf>,
}

/// One 32-byte key, wiped on drop.
struct SealKey {
    bytes: Zeroizing<[u8; 32]>,
    path: PathBuf,
}

impl SealKey {
    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&self.bytes[..]))
    }
}

/// The ledger's keys: the one that seals, and older ones that still open.
pub struct Keyring {
    current: SealKey,
    old: Vec<SealKey>,
}

/// A value opened, and whether it needed an old key (so it must be sealed again).
pub struct Opened {
    /// The plaintext, wiped on drop.
    pub plaintext: Zeroizing<String>,
    /// An old key opened it, or it was not sealed at all.
    pub stale: bool,
}

impl Keyring {
    /// Loads `key_file` (or `<state_dir>/ledger.key`, created on first use) and every old key.
    pub fn load(source: &KeySource, state_dir: &Path) -> Result<Keyring, KeyError> {
        let current = match source.key_file.as_deref() {
            Some(path) => read_key(path)?,
            None => {
                let path = state_dir.join(DEFAULT_KEY_FILE);
                if !path.exists() {
                    create_key(&path)?;
                    tracing::info!(key_file = %path.display(), "created a new ledger key");
                }
                read_key(&path)?
            }
        };
        let old = source
            .old_key_files
            .iter()
            .map(|p| read_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Keyring { current, old })
    }

    /// A keyring of one given key (tests).
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Keyring {
        Keyring {
            current: SealKey {
                bytes: Zeroizing::new(bytes),
                path: PathBuf::from("test.key"),
            },
            old: Vec::new(),
        }
    }

    /// The file of the key that seals.
    pub(crate) fn key_file(&self) -> &Path {
        &self.current.path
    }

    /// Whether old keys were configured.
    pub(crate) fn has_old_keys(&self) -> bool {
        !self.old.is_empty()
    }

    /// Seals `plaintext` for `aad` under the current key.
    pub fn seal(&self, plaintext: &str, aad: &str) -> String {
        self.seal_bytes(plaintext.as_bytes(), aad)
    }

    /// [`Keyring::seal`] of any bytes (a test seals bytes that are not text).
    fn seal_bytes(&self, plaintext: &[u8], aad: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .current
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        format!("{PREFIX}{}", B64.encode(out))
    }

    /// Opens a value sealed for `aad` with any known key. A value without the prefix is a
    /// plaintext left by an older tokend: returned as it is, marked stale.
    pub fn open(&self, value: &str, aad: &str) -> Result<Opened, String> {
        let Some(encoded) = value.strip_prefix(PREFIX) else {
            return Ok(Opened {
                plaintext: Zeroizing::new(value.to_owned()),
                stale: true,
            });
        };
        let mut buf = Zeroizing::new(Vec::new());
        let (plain, stale) = self.open_in(encoded, aad.as_bytes(), &mut buf)?;
        Ok(Opened {
            plaintext: Zeroizing::new(plain.to_owned()),
            stale,
        })
    }

    /// Both opens' work: the sealed value `encoded` (without its prefix) decoded into
    /// `buf` and opened there in place for `aad` with any known key; the plaintext (in
    /// `buf`, which the caller wipes) and whether an old key opened it.
    fn open_in<'b>(
        &self,
        encoded: &str,
        aad: &[u8],
        buf: &'b mut Vec<u8>,
    ) -> Result<(&'b mut str, bool), String> {
        buf.clear();
        B64.decode_vec(encoded, buf)
            .map_err(|_| "a sealed value is not valid base64".to_owned())?;
        if buf.len() < NONCE_LEN {
            return Err("a sealed value is too short".to_owned());
        }
        let (nonce, rest) = buf.split_at_mut(NONCE_LEN);
        let no_key = || {
            "no configured key opens it (a wrong key, or a value moved from another row)".to_owned()
        };
        // Shorter than a tag: no key opens it.
        let at = rest.len().checked_sub(TAG_LEN).ok_or_else(no_key)?;
        let (sealed, tag) = rest.split_at_mut(at);
        let keys = std::iter::once(&self.current).chain(self.old.iter());
        for (i, key) in keys.enumerate() {
            // A wrong key leaves `sealed` as it was: the tag is checked before decrypting.
            if key
                .cipher()
                .decrypt_in_place_detached(
                    XNonce::from_slice(nonce),
                    aad,
                    sealed,
                    Tag::from_slice(tag),
                )
                .is_ok()
            {
                let text = std::str::from_utf8_mut(sealed)
                    .map_err(|_| "a sealed value is not text".to_owned())?;
                return Ok((text, i > 0));
            }
        }
        Err(no_key())
    }

    /// An opener of many values on one thread (a load's): see [`Opener`].
    pub(crate) fn opener(&self) -> Opener<'_> {
        Opener {
            keys: self,
            buf: Zeroizing::new(Vec::new()),
            aad: String::new(),
        }
    }

    /// The key check value to store: proves at the next start that the key is the same.
    pub(crate) fn check_value(&self) -> String {
        self.seal(CHECK_PLAINTEXT, "tokend:keycheck")
    }

    /// Which key opens a stored check value: `Some(false)` the current one, `Some(true)` an
    /// old one, `None` none.
    pub(crate) fn verify(&self, check: &str) -> Option<bool> {
        let opened = self.open(check, "tokend:keycheck").ok()?;
        (opened.plaintext.as_str() == CHECK_PLAINTEXT && check.starts_with(PREFIX))
            .then_some(opened.stale)
    }
}

/// [`Keyring::open`] for a load's hundreds of thousands of tokens: the decoded bytes and the
/// associated data in buffers it keeps, the value opened in place, and the plaintext copied
/// once, into the [`Secret`] it returns. (`open` makes and frees four buffers a value: at
/// 100,000 connections, a good part of start-up's CPU went to them and to the allocator's
/// locks, its frees landing on other threads than its allocations.)
pub(crate) struct Opener<'k> {
    keys: &'k Keyring,
    /// The last value's bytes (its plaintext wiped once copied); wiped on drop.
    buf: Zeroizing<Vec<u8>>,
    aad: String,
}

impl Opener<'_> {
    /// Opens `value`, sealed for column `column` of connection `connection_id`, with any
    /// known key; the plaintext and whether it is stale, as [`Keyring::open`] says.
    pub(crate) fn open(
        &mut self,
        value: &str,
        connection_id: &str,
        column: &str,
    ) -> Result<(Secret, bool), String> {
        let Some(encoded) = value.strip_prefix(PREFIX) else {
            return Ok((Secret::new(value), true));
        };
        self.aad.clear();
        write_aad(&mut self.aad, connection_id, column);
        let (plain, stale) = self
            .keys
            .open_in(encoded, self.aad.as_bytes(), &mut self.buf)?;
        let secret = Secret::new(&*plain);
        // Wiped now, not when the buffer is next reused or dropped.
        zeroize::Zeroize::zeroize(plain);
        Ok((secret, stale))
    }
}

/// The associated data of a token column of a connection.
pub fn aad(connection_id: &str, column: &str) -> String {
    let mut out = String::new();
    write_aad(&mut out, connection_id, column);
    out
}

/// [`aad`], appended to `out`.
fn write_aad(out: &mut String, connection_id: &str, column: &str) {
    out.push_str("tokend:");
    out.push_str(connection_id);
    out.push(':');
    out.push_str(column);
}

fn read_key(path: &Path) -> Result<SealKey, KeyError> {
    let err = |reason: String| KeyError::File {
        path: path.to_path_buf(),
        reason,
    };
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
    let hex = text.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(err(
            "a key file holds 32 bytes as 64 hex digits (create one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`)".into(),
        ));
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| err(e.to_string()))?;
    }
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(key_file = %path.display(), "the ledger key file is readable by other users; it should be 0600 (or a systemd credential)");
    }
    Ok(SealKey {
        bytes,
        path: path.to_path_buf(),
    })
}

fn create_key(path: &Path) -> Result<(), KeyError> {
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(&mut key[..]);
    let hex = Zeroizing::new(key.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KeyError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    f.write_all(hex.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(|e| KeyError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_place() {
        let k = Keyring::from_bytes([7; 32]);
        let sealed = k.seal("rt-secret", &aad("c1", "refresh_token"));
        assert!(sealed.starts_with(PREFIX));
        assert!(!sealed.contains("rt-secret"));
        assert_eq!(
            k.open(&sealed, &aad("c1", "refresh_token"))
                .unwrap()
                .plaintext
                .as_str(),
            "rt-secret"
        );
        assert!(
            k.open(&sealed, &aad("c2", "refresh_token")).is_err(),
            "moved to another row"
        );
        assert!(
            k.open(&sealed, &aad("c1", "access_token")).is_err(),
            "moved to another column"
        );
        let other = Keyring::from_bytes([8; 32]);
        assert!(other.open(&sealed, &aad("c1", "refresh_token")).is_err());
        assert_ne!(
            sealed,
            k.seal("rt-secret", &aad("c1", "refresh_token")),
            "fresh nonces"
        );
    }

    #[test]
    fn old_keys_open_and_are_reported_stale_and_the_check_value_tells_keys_apart() {
        let old = Keyring::from_bytes([1; 32]);
        let sealed = old.seal("x", "a");
        let check = old.check_value();
        let mut ring = Keyring::from_bytes([2; 32]);
        assert_eq!(
            ring.verify(&check),
            None,
            "a new key alone does not open the old ledger"
        );
        ring.old.push(SealKey {
            bytes: Zeroizing::new([1; 32]),
            path: PathBuf::from("old.key"),
        });
        assert!(ring.open(&sealed, "a").unwrap().stale);
        assert_eq!(ring.verify(&check), Some(true));
        assert_eq!(ring.verify(&ring.check_value()), Some(false));
        let plain = ring.open("legacy-plaintext", "a").unwrap();
        assert!(plain.stale && plain.plaintext.as_str() == "legacy-plaintext");
    }

    /// The opener answers as `open` does, value after value with its reused buffers: a
    /// wrong key tried first leaves the value for the next key; a short, a malformed, a
    /// tampered, a moved or a non-text value fails; a plaintext passes, stale.
    #[test]
    fn the_opener_answers_as_open_does_value_after_value() {
        let old = Keyring::from_bytes([1; 32]);
        let mut ring = Keyring::from_bytes([2; 32]);
        ring.old.push(SealKey {
            bytes: Zeroizing::new([1; 32]),
            path: PathBuf::from("old.key"),
        });
        // `plain` sealed by `ring` for `at` (connection id, column), to be opened there.
        let sealed = |ring: &Keyring, plain: &str, at: (&'static str, &'static str)| {
            (ring.seal(plain, &aad(at.0, at.1)), at)
        };
        let rt = ("c1", "refresh_token");
        let mut tampered = ring.seal("rt-tampered", &aad(rt.0, rt.1));
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        let moved = |(value, _), to| (value, to);
        let values: Vec<(String, (&str, &str))> = vec![
            sealed(&ring, "rt-1", rt),
            sealed(&old, "rt-old", rt),
            sealed(&ring, &"long".repeat(100), ("c2", "access_token")),
            sealed(&ring, "", ("c2", "refresh_token")),
            moved(sealed(&ring, "rt-moved", rt), ("c3", "refresh_token")),
            moved(sealed(&ring, "rt-col", rt), ("c1", "access_token")),
            (tampered, rt),
            (format!("{PREFIX}AAAA"), rt),
            (format!("{PREFIX}{}", B64.encode([7u8; NONCE_LEN + 3])), rt),
            (format!("{PREFIX}not base64!"), rt),
            (ring.seal_bytes(&[0xff, 0xfe], &aad(rt.0, rt.1)), rt),
            ("legacy-plaintext".into(), rt),
            sealed(&ring, "rt-after", ("c4", "previous_refresh_token")),
        ];
        let mut opener = ring.opener();
        let mut opened = 0;
        for (value, (id, column)) in &values {
            let want = ring
                .open(value, &aad(id, column))
                .map(|o| (o.plaintext.as_str().to_owned(), o.stale));
            let got = opener
                .open(value, id, column)
                .map(|(secret, stale)| (secret.expose().to_owned(), stale));
            assert_eq!(got, want, "{value}");
            opened += usize::from(got.is_ok());
        }
        assert_eq!(
            opened, 6,
            "four sealed, one under the old key, one plaintext"
        );
    }

    #[test]
    fn key_files_are_created_0600_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::load(&KeySource::default(), dir.path()).unwrap();
        let path = dir.path().join(DEFAULT_KEY_FILE);
        assert_eq!(ring.key_file(), path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Keyring::load(&KeySource::default(), dir.path()).unwrap();
        let sealed = ring.seal("t", "a");
        assert!(
            again.open(&sealed, "a").is_ok(),
            "the created key is reused"
        );
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "not hex").unwrap();
        let source = KeySource {
            key_file: Some(bad),
            old_key_files: vec![],
        };
        let err = Keyring::load(&source, dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("64 hex digits") && err.contains("bad.key"),
            "{err}"
        );
    }
}
