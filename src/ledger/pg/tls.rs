//! `ledger.url` for PostgreSQL: the URL, its `sslmode` as libpq means it, and the rustls
//! connector (no OpenSSL) that honours it.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only, and never checks a
//! certificate by itself. So `sslmode` and `sslrootcert` are taken out of the URL here and
//! carried out by the rustls verifier, as libpq does:
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default) | if the server offers it | no |
//! | `require` | always | no (as `verify-ca` when `sslrootcert` is given, like libpq) |
//! | `verify-ca` | always | chain to a root of the `sslrootcert` file (required) |
//! | `verify-full` | always | chain, and the host name |
//!
//! Trusted roots are the PEM certificates of `sslrootcert` (a file). Only `verify-full` may
//! trust the Mozilla roots compiled in (`webpki-roots`: no `sslrootcert`, or
//! `sslrootcert=system`, which alone implies `verify-full`, as in libpq 16): any public CA
//! can issue a certificate for *some* name, so a public root without the name check
//! authenticates nobody. `verify-ca` without a root file, or `sslrootcert=system` with a
//! weaker mode, is refused.
//!
//! The query is found after the authority (the last `@` before the path), and the user
//! information is percent-encoded again before tokio-postgres reads it, so a password
//! holding a raw `?` or `@` can neither hide `sslmode` nor move the host. tokio-postgres is
//! then handed the `sslmode` it understands and must read it back unchanged.
//!
//! **Architecture Invariant:** no error of this module quotes the URL (it may hold a
//! password).

use super::PgError;
use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

/// `sslmode`, as libpq spells and means it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, certificate unchecked.
    Prefer,
    /// TLS, certificate unchecked.
    Require,
    /// TLS, certificate chained to a trusted root.
    VerifyCa,
    /// TLS, certificate chained to a trusted root and naming the host.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// A parsed `ledger.url`.
pub struct Target {
    /// Everything tokio-postgres is told (its `ssl_mode` set from [`Target::mode`]).
    pub config: tokio_postgres::Config,
    /// The `sslmode` asked for.
    pub mode: SslMode,
    /// `sslrootcert`, when a file.
    pub root_cert: Option<PathBuf>,
    /// The query keys the URL gave (lower-case), so that tokend's defaults (timeouts,
    /// keepalives) apply only where the URL said nothing.
    pub given: Vec<String>,
}

impl Target {
    /// Whether the URL set query parameter `key`.
    pub fn gave(&self, key: &str) -> bool {
        self.given.iter().any(|k| k == key)
    }
}

/// Where the user information of `rest` (a URL after `scheme://`) ends: the last `@` before
/// the path (the first `/`), if any. A password may hold a raw `@` or `?` (not a raw `/`:
/// percent-encode it); a host never holds `@`.
fn userinfo_end(rest: &str) -> Option<usize> {
    let path = rest.find('/').unwrap_or(rest.len());
    rest[..path].rfind('@')
}

/// Percent-encodes what tokio-postgres would misread in user information (`@`, `?`, `/`,
/// `#`, and a `:` after the first), keeping escapes already there.
fn encode_userinfo(info: &str) -> String {
    let mut out = String::with_capacity(info.len());
    let mut colon_seen = false;
    for ch in info.chars() {
        match ch {
            ':' if !colon_seen => {
                colon_seen = true;
                out.push(':');
            }
            '@' | '?' | '/' | '#' | ':' | '&' | '=' | ' ' => {
                out.push_str(&format!("%{:02X}", ch as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// Parses a `postgres://` (or `postgresql://`) URL. Errors never quote it.
pub fn parse_url(url: &str) -> Result<Target, PgError> {
    let url = url.trim();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(PgError::Url(
            "it must start with postgres:// or postgresql://".into(),
        ));
    }
    let (scheme, rest) = url.split_once("://").unwrap_or((url, ""));
    let (userinfo, hostpart) = match userinfo_end(rest) {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (base, query) = hostpart.split_once('?').unwrap_or((hostpart, ""));
    let mut mode = None;
    let mut root_cert = None;
    let mut system_roots = false;
    let mut kept = Vec::new();
    let mut given = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = url::form_urlencoded::parse(pair.as_bytes())
            .next()
            .unwrap_or_default();
        given.push(key.to_ascii_lowercase());
        match &*key {
            "sslmode" => {
                mode = Some(SslMode::parse(&value).ok_or_else(|| {
                    PgError::Url(
                        "sslmode must be disable, prefer, require, verify-ca or verify-full".into(),
                    )
                })?);
            }
            "sslrootcert" => {
                if value == "system" {
                    system_roots = true;
                } else {
                    root_cert = Some(PathBuf::from(&*value));
                }
            }
            _ => kept.push(pair),
        }
    }
    let mode = match mode {
        // libpq 16: sslrootcert=system alone means verify-full.
        None if system_roots => SslMode::VerifyFull,
        None => SslMode::Prefer,
        Some(SslMode::Require) if root_cert.is_some() => SslMode::VerifyCa,
        Some(m) => m,
    };
    if system_roots && mode != SslMode::VerifyFull {
        return Err(PgError::Url(
            "sslrootcert=system trusts every public CA, so it needs sslmode=verify-full (the host name checked)".into(),
        ));
    }
    if mode == SslMode::VerifyCa && root_cert.is_none() {
        return Err(PgError::Url(
            "sslmode=verify-ca needs sslrootcert=<file> (the CA that signs the server's certificate); with public CAs use sslmode=verify-full".into(),
        ));
    }
    // tokio-postgres is told the mode it knows, and must read it back: a URL it splits
    // otherwise than tokend did is refused rather than silently downgraded.
    let wire = match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    };
    let wire_name = match wire {
        tokio_postgres::config::SslMode::Disable => "disable",
        tokio_postgres::config::SslMode::Prefer => "prefer",
        _ => "require",
    };
    let sslmode = format!("sslmode={wire_name}");
    kept.push(&sslmode);
    let rest = match userinfo {
        Some(info) => format!(
            "{scheme}://{}@{base}?{}",
            encode_userinfo(info),
            kept.join("&")
        ),
        None => format!("{scheme}://{base}?{}", kept.join("&")),
    };
    let config = tokio_postgres::Config::from_str(&rest)
        // tokio-postgres names the option, never its value.
        .map_err(|e| PgError::Url(super::describe(&e)))?;
    if config.get_ssl_mode() != wire {
        return Err(PgError::Url(
            "tokio-postgres reads another sslmode from it than tokend does; percent-encode the special characters of the user and password".into(),
        ));
    }
    Ok(Target {
        config,
        mode,
        root_cert,
        given,
    })
}

/// What stands for a password in a URL shown to the user.
pub const PASSWORD_PLACEHOLDER: &str = "PASSWORD";

/// `url` with its password (in the user info, or a `password=` parameter) replaced by
/// [`PASSWORD_PLACEHOLDER`], and whether it had one: the form of a URL that may be printed
/// (`tokend migrate-ledger`'s `daemon.toml` lines). Done on the text, so that nothing else
/// of the URL is re-encoded or reordered (and several hosts, `h1,h2`, stay as they are).
pub fn with_password_placeholder(url: &str) -> (String, bool) {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), false);
    };
    let mut had = false;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) =
        before_query.split_at(before_query.find('/').unwrap_or(before_query.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => {
                had = true;
                format!("{user}:{PASSWORD_PLACEHOLDER}@{host}")
            }
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some(("password", _)) => {
                    had = true;
                    format!("password={PASSWORD_PLACEHOLDER}")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    (out, had)
}

/// The rustls connector for `mode` (unused under `disable`).
pub fn connector(target: &Target) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PgError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(e.to_string()))?;
    let roots = Arc::new(roots(target)?);
    let verifier: Arc<dyn ServerCertVerifier> = match target.mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(Lenient {
            provider: provider.clone(),
            chain: None,
        }),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| PgError::Tls(e.to_string()))?;
            if target.mode == SslMode::VerifyCa {
                Arc::new(Lenient {
                    provider: provider.clone(),
                    chain: Some(webpki),
                })
            } else {
                webpki
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn roots(target: &Target) -> Result<rustls::RootCertStore, PgError> {
    let mut store = rustls::RootCertStore::empty();
    match &target.root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    PgError::Tls(format!("cannot read sslrootcert {}: {e}", path.display()))
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(PgError::Tls(format!(
                    "sslrootcert {} holds no usable certificate",
                    path.display()
                )));
            }
        }
        // parse_url allows no root file only under verify-full (and the unchecked modes,
        // which never read the store).
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(store)
}

/// The verifiers that check less than `verify-full`: `prefer` / `require` (no `chain`):
/// encryption without authentication, as libpq does; `verify-ca` (a `chain` verifier): the
/// chain must reach a trusted root, the name is not checked. Either way the handshake's
/// signatures are still checked (the peer holds the certificate's key), with the provider's
/// algorithms (the chain verifier's are the same provider's).
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_taken_from_the_url_and_never_echoed() {
        let t = parse_url("postgres://u:pw@db.example:5433/tokend?sslmode=verify-full").unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(t.config.get_dbname(), Some("tokend"));
        assert_eq!(t.config.get_ports(), &[5433]);
        let t = parse_url("postgresql://u@h/db").unwrap();
        assert_eq!(t.mode, SslMode::Prefer, "libpq's default");
        let t = parse_url("postgres://u@h/db?sslmode=disable&application_name=x").unwrap();
        assert_eq!(t.mode, SslMode::Disable);
        assert_eq!(t.config.get_application_name(), Some("x"));
        let t = parse_url("postgres://u@h/db?sslrootcert=%2Fetc%2Fca.pem&sslmode=require").unwrap();
        assert_eq!(
            t.mode,
            SslMode::VerifyCa,
            "require with a root file is verify-ca"
        );
        assert_eq!(
            t.root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        for bad in [
            "postgres://u:hunter2@h/db?sslmode=allow-ish",
            "postgres://u:hunter2@h/db?password_typo=hunter2",
            "mysql://u:hunter2@h/db",
        ] {
            let err = parse_url(bad).err().expect(bad).to_string();
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn a_password_is_replaced_by_the_placeholder_and_nothing_else_changes() {
        let cases = [
            (
                "postgres://tokend:s3cr%40t@db.example:5432/tokend?sslmode=verify-full",
                "postgres://tokend:PASSWORD@db.example:5432/tokend?sslmode=verify-full",
                true,
            ),
            (
                "postgresql://u@h1,h2/db?password=s3cret&sslmode=require",
                "postgresql://u@h1,h2/db?password=PASSWORD&sslmode=require",
                true,
            ),
            (
                "postgres://tokend@db/tokend?sslmode=verify-full",
                "postgres://tokend@db/tokend?sslmode=verify-full",
                false,
            ),
            (
                "postgres:///tokend?host=/run/postgresql",
                "postgres:///tokend?host=/run/postgresql",
                false,
            ),
        ];
        for (url, shown, had) in cases {
            assert_eq!(
                with_password_placeholder(url),
                (shown.to_owned(), had),
                "{url}"
            );
        }
    }

    #[test]
    fn a_missing_root_file_is_a_clear_error() {
        let t = parse_url("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .unwrap();
        let err = connector(&t).err().expect("no file").to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        for mode in ["prefer", "require", "verify-full"] {
            let t = parse_url(&format!("postgres://u@h/db?sslmode={mode}")).unwrap();
            assert!(connector(&t).is_ok(), "{mode}");
        }
    }

    #[test]
    fn public_roots_only_with_the_name_checked() {
        // verify-ca without a root file would trust any public CA for any name: refused.
        let err = parse_url("postgres://u:hunter2@h/db?sslmode=verify-ca")
            .err()
            .expect("verify-ca needs a root file")
            .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        for weak in ["verify-ca", "require", "prefer", "disable"] {
            let err = parse_url(&format!(
                "postgres://u@h/db?sslmode={weak}&sslrootcert=system"
            ))
            .err()
            .unwrap_or_else(|| panic!("sslrootcert=system with {weak}"))
            .to_string();
            assert!(err.contains("verify-full"), "{err}");
        }
        let t = parse_url("postgres://u@h/db?sslrootcert=system").unwrap();
        assert_eq!(
            t.mode,
            SslMode::VerifyFull,
            "system alone means verify-full"
        );
        assert!(connector(&t).is_ok());
        let t = parse_url("postgres://u@h/db?sslmode=verify-full&sslrootcert=system").unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
    }

    #[test]
    fn a_password_with_question_marks_or_ats_hides_nothing() {
        for (url, password) in [
            (
                "postgres://u:pa?ss@db.example/tokend?sslmode=verify-full",
                "pa?ss",
            ),
            (
                "postgres://u:pa@ss@db.example/tokend?sslmode=verify-full",
                "pa@ss",
            ),
            (
                "postgres://u:pa%3Fss@db.example/tokend?sslmode=verify-full",
                "pa?ss",
            ),
            (
                "postgres://u:pa%40ss@db.example/tokend?sslmode=verify-full",
                "pa@ss",
            ),
            (
                "postgres://u:p?a@s?s@db.example/tokend?sslmode=verify-full",
                "p?a@s?s",
            ),
        ] {
            let t = parse_url(url).unwrap_or_else(|e| panic!("{password}: {e}"));
            assert_eq!(t.mode, SslMode::VerifyFull, "{password}");
            assert_eq!(
                t.config.get_ssl_mode(),
                tokio_postgres::config::SslMode::Require,
                "{password}"
            );
            assert_eq!(t.config.get_password(), Some(password.as_bytes()));
            assert_eq!(t.config.get_user(), Some("u"));
            assert_eq!(t.config.get_dbname(), Some("tokend"));
            assert!(
                matches!(&t.config.get_hosts()[0], tokio_postgres::config::Host::Tcp(h) if h == "db.example"),
                "{password}: {:?}",
                t.config.get_hosts()
            );
        }
        // A URL tokio-postgres would read another sslmode from is refused.
        let t = parse_url("postgres://u@h/db?sslmode=require&sslmode=disable").unwrap();
        assert_eq!(t.mode, SslMode::Disable, "the last one wins, for both");
    }
}
