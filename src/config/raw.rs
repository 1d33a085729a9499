//! Pass 1: the TOML text into private `Raw*` structs that mirror the file one to one
//! (`deny_unknown_fields` everywhere, every key optional, values kept as written), and TOML
//! and type errors as [`ConfigError`]s with the dotted key and line.

use std::path::Path;

use serde::Deserialize;

use super::validate::locate_dotted;
use super::{CLIENT_SECRET_ENV, ConfigError};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) daemon: RawDaemon,
    pub(super) refresh: RawRefresh,
    pub(super) jobs: RawJobs,
    pub(super) notify: RawNotify,
    pub(super) access: RawAccess,
    pub(super) providers: RawProviders,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDaemon {
    pub(super) state_dir: Option<String>,
    pub(super) socket_path: Option<String>,
    pub(super) socket_mode: Option<String>,
    pub(super) metrics_listen: Option<String>,
    pub(super) log_format: Option<String>,
    pub(super) log_level: Option<String>,
    pub(super) metrics_per_connection: Option<bool>,
    pub(super) key_file: Option<String>,
    pub(super) old_key_files: Option<Vec<String>>,
    pub(super) node_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRefresh {
    pub(super) access_token_margin: Option<String>,
    pub(super) rotate_after: Option<String>,
    pub(super) inactivity_expiry: Option<String>,
    pub(super) absolute_expiry: Option<String>,
    pub(super) max_concurrent: Option<i64>,
    pub(super) request_timeout: Option<String>,
    pub(super) backoff_min: Option<String>,
    pub(super) backoff_max: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawJobs {
    pub(super) resolve_sites: Option<String>,
    pub(super) maintenance: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawNotify {
    pub(super) command: Option<String>,
    pub(super) timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAccess {
    pub(super) admin_uids: Vec<u32>,
    pub(super) admin_gids: Vec<u32>,
    pub(super) clients: Vec<RawClient>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawClient {
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    pub(super) connections: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawProviders {
    pub(super) atlassian: RawAtlassian,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAtlassian {
    pub(super) client_id: Option<String>,
    pub(super) client_secret_file: Option<String>,
    pub(super) scopes: Option<Vec<String>>,
    pub(super) redirect_uri: Option<String>,
    pub(super) authorize_url: Option<String>,
    pub(super) token_url: Option<String>,
    pub(super) api_url: Option<String>,
}

pub(super) fn parse(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, file, &e, None))?;
    serde_path_to_error::deserialize::<_, RawConfig>(de).map_err(|e| {
        let path = e.path().to_string();
        let key = (path != ".").then_some(path);
        toml_error(text, file, e.inner(), key)
    })
}

fn toml_error(text: &str, file: &Path, e: &toml::de::Error, key: Option<String>) -> ConfigError {
    let line = e
        .span()
        .map(|span| line_of_offset(text, span.start))
        .or_else(|| key.as_deref().and_then(|k| locate_dotted(text, k)));
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
