//! Pass 1: the TOML text into private `Raw*` structs that mirror the file one to one
//! (`deny_unknown_fields` everywhere, every key optional, values kept as written), and TOML
//! and type errors as [`ConfigError`]s with the dotted key and line.

use std::path::Path;

use serde::Deserialize;
use serde_path_to_error::{Path as KeyPath, Segment};
use toml::Spanned;

use super::{CLIENT_SECRET_ENV, ConfigError};

/// A value as written, with where it was written: its byte span in the text, from the TOML
/// parser itself, so that a validation error names the exact line of the key.
pub(super) type At<T> = Option<Spanned<T>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) daemon: RawDaemon,
    pub(super) refresh: RawRefresh,
    pub(super) jobs: RawJobs,
    pub(super) notify: RawNotify,
    pub(super) ledger: RawLedger,
    pub(super) access: RawAccess,
    pub(super) providers: RawProviders,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDaemon {
    pub(super) state_dir: At<String>,
    pub(super) socket_path: At<String>,
    pub(super) socket_mode: At<String>,
    pub(super) metrics_listen: At<String>,
    pub(super) log_format: At<String>,
    pub(super) log_level: At<String>,
    pub(super) metrics_per_connection: Option<bool>,
    pub(super) key_file: At<String>,
    pub(super) old_key_files: At<Vec<Spanned<String>>>,
    pub(super) node_name: At<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLedger {
    pub(super) url: At<String>,
    pub(super) url_file: At<String>,
    pub(super) lease: At<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRefresh {
    pub(super) access_token_margin: At<String>,
    pub(super) rotate_after: At<String>,
    pub(super) inactivity_expiry: At<String>,
    pub(super) absolute_expiry: At<String>,
    pub(super) max_concurrent: At<i64>,
    pub(super) request_timeout: At<String>,
    pub(super) backoff_min: At<String>,
    pub(super) backoff_max: At<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawJobs {
    pub(super) resolve_sites: At<String>,
    pub(super) maintenance: At<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawNotify {
    pub(super) command: Option<String>,
    pub(super) timeout: At<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAccess {
    pub(super) admin_uids: Vec<u32>,
    pub(super) admin_gids: Vec<u32>,
    pub(super) clients: Vec<Spanned<RawClient>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawClient {
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    pub(super) connections: At<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawProviders {
    pub(super) atlassian: RawAtlassian,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAtlassian {
    pub(super) client_id: At<String>,
    pub(super) client_secret_file: At<String>,
    pub(super) scopes: At<Vec<String>>,
    pub(super) redirect_uri: At<String>,
    pub(super) authorize_url: At<String>,
    pub(super) token_url: At<String>,
    pub(super) api_url: At<String>,
}

pub(super) fn parse(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, file, &e, None))?;
    serde_path_to_error::deserialize::<_, RawConfig>(de).map_err(|e| {
        let key = dotted(e.path());
        toml_error(text, file, e.inner(), key)
    })
}

fn toml_error(text: &str, file: &Path, e: &toml::de::Error, key: Option<String>) -> ConfigError {
    let line = e.span().map(|span| line_of_offset(text, span.start));
    let mut message = humane_serde_message(e.message().trim_end());
    if key
        .as_deref()
        .is_some_and(|k| k.ends_with("atlassian.client_secret") && message.contains("unknown"))
    {
        message.push_str(&format!(
            " (the secret never sits in the file: use client_secret_file or the environment \
             variable {CLIENT_SECRET_ENV})"
        ));
    }
    ConfigError {
        file: file.to_owned(),
        key,
        line,
        message,
    }
}

/// The dotted key of a serde path (`access.clients[1].uid`), without the private fields
/// through which [`Spanned`] reads a value; `None` for the whole document.
fn dotted(path: &KeyPath) -> Option<String> {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key.starts_with("$__serde_spanned_private") {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// serde's messages name Rust types (`expected struct RawDaemon`, `expected u32`); say it in
/// TOML words instead.
fn humane_serde_message(message: &str) -> String {
    let mut out = message.to_owned();
    if let Some(at) = out.find("expected struct Raw") {
        out.replace_range(at.., "expected a table");
    }
    for (rust, toml) in [
        ("expected i64", "expected an integer"),
        (
            "expected u32",
            "expected an integer between 0 and 4294967295",
        ),
        ("expected a sequence", "expected an array"),
    ] {
        out = out.replace(rust, toml);
    }
    out
}

/// 1-based line of a byte offset.
pub(super) fn line_of_offset(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
