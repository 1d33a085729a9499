//! The human output of the client commands: `list`'s table, `show`'s `key: value` form,
//! `events`' lines and the one-line answers of `import` and `connect`. Pure functions of
//! the wire types ([`crate::wire`]), so every layout is tested without a daemon.

use std::io::Write;

use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

use super::Failure;
use crate::model::Time;
use crate::wire::{self, Connection, Event, Site};

/// Writes `text` to the command's output; a closed stdout is a runtime failure, not a panic.
pub(super) fn emit(out: &mut dyn Write, text: &str) -> Result<(), Failure> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::runtime(format!("cannot write to stdout: {e}")))
}

/// `--json`: the daemon's own JSON, pretty-printed (a field a newer daemon adds is kept).
pub(super) fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// One element of a `--json` array, pretty-printed as [`pretty`] prints it inside the array
/// (the reference [`pretty_page`] is tested against).
#[cfg(test)]
pub(super) fn pretty_element(value: &Value) -> String {
    pretty(value).replace('\n', "\n  ")
}

/// `tokend list --json`: the elements of one page (a JSON array), appended to `out` as
/// [`pretty`] of the whole listing prints them, each after `[` or `,` (`wrote`: an element
/// came before). The page is not parsed into a [`Value`]: each object's members are borrowed
/// from the text and sorted by key (a `Value`'s map is sorted), scalars copied as the daemon
/// wrote them (serde_json's own form, which a `Value` would print the same). At 100,000
/// connections the `Value`s were half of the listing's CPU.
pub(super) fn pretty_page(
    page: &[u8],
    wrote: &mut bool,
    out: &mut String,
) -> Result<(), serde_json::Error> {
    let elements: Vec<&RawValue> = serde_json::from_slice(page)?;
    for e in elements {
        out.push_str(if *wrote { ",\n  " } else { "[\n  " });
        pretty_raw(e.get(), 1, out)?;
        *wrote = true;
    }
    Ok(())
}

/// `raw`, one JSON value, pretty-printed at nesting `depth` (two spaces a level) as
/// serde_json prints a [`Value`].
fn pretty_raw(raw: &str, depth: usize, out: &mut String) -> Result<(), serde_json::Error> {
    let indent = |out: &mut String, depth: usize| {
        for _ in 0..depth {
            out.push_str("  ");
        }
    };
    match raw.as_bytes().first() {
        Some(b'{') => {
            // Keys borrowed when they have no escapes (the daemon's never do).
            let members: Vec<(std::borrow::Cow<'_, str>, &RawValue)> =
                match serde_json::from_str::<BTreeMap<&str, &RawValue>>(raw) {
                    Ok(map) => map.into_iter().map(|(k, v)| (k.into(), v)).collect(),
                    Err(_) => serde_json::from_str::<BTreeMap<String, &RawValue>>(raw)?
                        .into_iter()
                        .map(|(k, v)| (k.into(), v))
                        .collect(),
                };
            if members.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, value)) in members.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                indent(out, depth + 1);
                match key {
                    // Borrowed: no escapes, so its text is already serde_json's own.
                    std::borrow::Cow::Borrowed(k) => {
                        out.push('"');
                        out.push_str(k);
                        out.push('"');
                    }
                    std::borrow::Cow::Owned(k) => out.push_str(&serde_json::to_string(k)?),
                }
                out.push_str(": ");
                pretty_raw(value.get(), depth + 1, out)?;
            }
            out.push('\n');
            indent(out, depth);
            out.push('}');
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(raw)?;
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                indent(out, depth + 1);
                pretty_raw(item.get(), depth + 1, out)?;
            }
            out.push('\n');
            indent(out, depth);
            out.push(']');
        }
        _ => out.push_str(raw),
    }
    Ok(())
}

/// `tokend events`: one line per event, newest first.
pub(super) fn format_events(events: &[Event]) -> String {
    let mut s = String::new();
    for e in events {
        let peer = match e.peer {
            Some(wire::EventPeer {
                uid,
                pid: Some(pid),
            }) => format!("uid {uid} pid {pid}"),
            Some(wire::EventPeer { uid, pid: None }) => format!("uid {uid}"),
            None => "-".to_owned(),
        };
        s.push_str(&format!(
            "{}  {:<22} {:>6}  {:<20} {}\n",
            time(Some(e.at)),
            e.kind.as_str(),
            e.count,
            peer,
            e.message
        ));
    }
    if s.is_empty() {
        s.push_str("no events\n");
    }
    s
}

fn site_hosts(sites: &[Site]) -> Vec<String> {
    sites.iter().map(Site::host).collect()
}

/// A time for humans: RFC 3339 UTC to the second, `-` when absent.
fn time(value: Option<Time>) -> String {
    value.map_or_else(|| "-".to_owned(), |t| wire::time::format(&t))
}

fn or_dash(value: &str) -> &str {
    if value.is_empty() { "-" } else { value }
}

/// The one-line answer of `import` and `connect`: 201 created, 200 an existing connection
/// for the same account took the new chain.
pub(super) fn added_summary(verb: &str, status: u16, conn: &Connection) -> String {
    if status == 200 {
        return format!(
            "updated existing connection {} ({}) with the new refresh token",
            conn.id, conn.label
        );
    }
    let hosts = site_hosts(&conn.sites);
    let listed = if hosts.is_empty() {
        String::new()
    } else {
        format!(": {}", hosts.join(", "))
    };
    format!(
        "{verb} connection {} ({}) for account {}, {} site(s){listed}",
        conn.id,
        conn.label,
        conn.account_id.as_deref().unwrap_or("unknown"),
        hosts.len()
    )
}

/// `refresh`'s one-line answer.
pub(super) fn refreshed_summary(conn: &Connection) -> String {
    format!(
        "refreshed {} ({}): status {}, next rotation {}\n",
        conn.id,
        conn.label,
        conn.status,
        time(conn.next_rotation_at)
    )
}

/// `list`'s table: columns padded to their widest cell, two spaces apart, no trailing blanks.
#[cfg(test)]
pub(super) fn format_table(conns: &[Connection]) -> String {
    render_table(conns.iter().map(table_row).collect())
}

/// One connection's cells in `list`'s table: what `tokend list` keeps of each page, so
/// that its memory holds a few short strings per connection, not every connection's JSON.
pub(super) fn table_row(c: &Connection) -> Vec<String> {
    let hosts = site_hosts(&c.sites).join(",");
    vec![
        c.id.clone(),
        or_dash(&c.label).to_string(),
        c.status.to_string(),
        c.account_id.clone().unwrap_or_else(|| "-".into()),
        or_dash(&hosts).to_string(),
        time(c.next_rotation_at),
        time(Some(c.inactivity_expires_at)),
    ]
}

/// `list`'s table from the rows of [`table_row`].
pub(super) fn render_table(body: Vec<Vec<String>>) -> String {
    if body.is_empty() {
        return "no connections\n".to_string();
    }
    let header = [
        "ID",
        "LABEL",
        "STATUS",
        "ACCOUNT",
        "SITES",
        "NEXT ROTATION",
        "INACTIVITY DEADLINE",
    ]
    .map(String::from)
    .to_vec();
    let mut rows = vec![header];
    rows.extend(body);
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths[i] - cell.chars().count();
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `show`'s human form: `key: value` lines, sites as an indented list, last_error if any.
pub(super) fn format_show(c: &Connection) -> String {
    let fields: [(&str, String); 15] = [
        ("id", c.id.clone()),
        ("label", c.label.clone()),
        ("provider", or_dash(&c.provider).to_owned()),
        ("status", c.status.to_string()),
        (
            "account_id",
            c.account_id.clone().unwrap_or_else(|| "unknown".into()),
        ),
        ("scopes", or_dash(&c.scopes.join(" ")).to_owned()),
        ("access_token_expires_at", time(c.access_token_expires_at)),
        (
            "refresh_token_rotated_at",
            time(Some(c.refresh_token_rotated_at)),
        ),
        ("next_rotation_at", time(c.next_rotation_at)),
        ("inactivity_expires_at", time(Some(c.inactivity_expires_at))),
        ("absolute_expires_at", time(c.absolute_expires_at)),
        ("last_refresh_at", time(c.last_refresh_at)),
        ("consecutive_failures", c.consecutive_failures.to_string()),
        ("created_at", time(Some(c.created_at))),
        ("updated_at", time(Some(c.updated_at))),
    ];
    let mut lines: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    if c.sites.is_empty() {
        lines.push("sites: none".to_string());
    } else {
        lines.push("sites:".to_string());
        for site in &c.sites {
            let name = if site.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", site.name)
            };
            lines.push(format!("  - {}{name}", site.host()));
            lines.push(format!("    cloud_id: {}", or_dash(&site.cloud_id)));
            lines.push(format!("    url: {}", or_dash(&site.url)));
            lines.push(format!("    scopes: {}", or_dash(&site.scopes.join(" "))));
            if !site.api_base_urls.is_empty() {
                lines.push("    api_base_urls:".to_string());
                for (product, base) in &site.api_base_urls {
                    lines.push(format!("      {product}: {base}"));
                }
            }
            lines.push(format!(
                "    last_seen_at: {}",
                time(Some(site.last_seen_at))
            ));
        }
    }
    if let Some(err) = &c.last_error {
        lines.push(format!(
            "last_error: {}: {} (at {})",
            err.code,
            err.message,
            time(Some(err.at))
        ));
    }
    // Only while a refresh is in flight on a shared ledger: which daemon it waits on.
    if let Some(claim) = &c.claim {
        lines.push(format!(
            "refresh claimed by: {} (until {})",
            claim.node,
            time(Some(claim.until))
        ));
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Any JSON value as serde_json writes one: keys and strings with escapes, quotes,
    /// controls and non-ASCII text, integers and floats, nesting.
    fn any_json() -> impl Strategy<Value = Value> {
        let text = "[a-c\"\\\u{1}\n/é😀 ]{0,6}";
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e300f64..1e300).prop_map(Value::from),
            text.prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((text, inner), 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    /// The old way: every element parsed into a `Value` and pretty-printed.
    fn by_value(pages: &[Vec<Value>]) -> String {
        let mut text = String::new();
        let mut wrote = false;
        for page in pages {
            for e in page {
                text.push_str(if wrote { ",\n  " } else { "[\n  " });
                text.push_str(&pretty_element(e));
                wrote = true;
            }
        }
        text
    }

    proptest! {
        /// `pretty_page` prints pages exactly as the `Value` way did, and the pages
        /// together as `pretty` prints the whole array.
        #[test]
        fn pretty_pages_print_as_values_do(pages in prop::collection::vec(prop::collection::vec(any_json(), 0..4), 0..4)) {
            let mut text = String::new();
            let mut wrote = false;
            for page in &pages {
                let body = serde_json::to_vec(page).unwrap();
                pretty_page(&body, &mut wrote, &mut text).unwrap();
            }
            prop_assert_eq!(&text, &by_value(&pages));
            let all: Vec<Value> = pages.concat();
            if !all.is_empty() {
                text.push_str("\n]");
                prop_assert_eq!(text, pretty(&Value::Array(all)));
            }
        }
    }

    #[test]
    fn a_page_that_is_not_a_json_array_is_an_error() {
        for bad in [&b"{\"a\": 1}"[..], b"[1, ", b"[{\"a\": }]", b"", b"nul"] {
            let mut text = String::new();
            let mut wrote = false;
            assert!(
                pretty_page(bad, &mut wrote, &mut text).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    pub(in crate::cli) fn sample_connection() -> Value {
        json!({
            "id": "c_01",
            "label": "confluence-prod",
            "provider": "atlassian",
            "account_id": "557058:abcd",
            "status": "active",
            "scopes": ["offline_access", "read:page:confluence"],
            "sites": [{
                "cloud_id": "1111-2222",
                "url": "https://example.atlassian.net",
                "name": "Example",
                "scopes": ["read:page:confluence"],
                "api_base_urls": {"confluence": "https://api.atlassian.com/ex/confluence/1111-2222"},
                "last_seen_at": "2025-01-02T03:04:05Z"
            }, {
                "cloud_id": "3333",
                "url": "https://other.atlassian.net",
                "name": "Other",
                "scopes": [],
                "api_base_urls": {},
                "last_seen_at": "2025-01-03T03:04:05.750Z"
            }],
            "access_token_expires_at": "2025-01-02T04:04:05Z",
            "refresh_token_rotated_at": "2025-01-02T03:04:05Z",
            "next_rotation_at": "2025-01-09T03:04:05.123456Z",
            "inactivity_expires_at": "2025-04-02T03:04:05+00:00",
            "absolute_expires_at": null,
            "last_refresh_at": "2025-01-02T03:04:05Z",
            "last_error": {"code": "provider_unavailable", "message": "HTTP 502", "at": "2025-01-01T00:00:00Z"},
            "consecutive_failures": 1,
            "created_at": "2024-12-01T00:00:00Z",
            "updated_at": "2025-01-02T03:04:05Z"
        })
    }

    fn view(value: Value) -> Connection {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn table_lists_connections_aligned() {
        let mut second = sample_connection();
        second["id"] = json!("c_2");
        second["label"] = json!("jira");
        second["status"] = json!("needs_reauth");
        second["account_id"] = Value::Null;
        second["sites"] = json!([]);
        second["next_rotation_at"] = Value::Null;
        let table = format_table(&[view(sample_connection()), view(second)]);
        let expected = "\
ID    LABEL            STATUS        ACCOUNT      SITES                                      NEXT ROTATION         INACTIVITY DEADLINE
c_01  confluence-prod  active        557058:abcd  example.atlassian.net,other.atlassian.net  2025-01-09T03:04:05Z  2025-04-02T03:04:05Z
c_2   jira             needs_reauth  -            -                                          -                     2025-04-02T03:04:05Z
";
        assert_eq!(table, expected);
    }

    #[test]
    fn empty_table_says_so() {
        assert_eq!(format_table(&[]), "no connections\n");
    }

    #[test]
    fn show_prints_fields_sites_and_last_error() {
        let text = format_show(&view(sample_connection()));
        for line in [
            "id: c_01",
            "label: confluence-prod",
            "account_id: 557058:abcd",
            "scopes: offline_access read:page:confluence",
            "next_rotation_at: 2025-01-09T03:04:05Z",
            "absolute_expires_at: -",
            "consecutive_failures: 1",
            "sites:",
            "  - example.atlassian.net (Example)",
            "    cloud_id: 1111-2222",
            "      confluence: https://api.atlassian.com/ex/confluence/1111-2222",
            "  - other.atlassian.net (Other)",
            "    last_seen_at: 2025-01-03T03:04:05Z",
            "last_error: provider_unavailable: HTTP 502 (at 2025-01-01T00:00:00Z)",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let mut healthy = sample_connection();
        healthy["last_error"] = Value::Null;
        assert!(!format_show(&view(healthy)).contains("last_error"));
        assert!(
            !text.contains("refresh claimed by"),
            "no claim, no line: {text}"
        );
    }

    #[test]
    fn show_names_the_claim_holder_while_a_refresh_is_in_flight() {
        let mut claimed = sample_connection();
        claimed["claim"] = json!({"node": "b#1a2b3c4d", "until": "2025-01-02T03:04:05Z"});
        let text = format_show(&view(claimed));
        assert!(
            text.lines()
                .any(|l| l == "refresh claimed by: b#1a2b3c4d (until 2025-01-02T03:04:05Z)"),
            "{text}"
        );
    }

    #[test]
    fn import_summaries() {
        let conn = view(sample_connection());
        assert_eq!(
            added_summary("imported", 201, &conn),
            "imported connection c_01 (confluence-prod) for account 557058:abcd, 2 site(s): \
             example.atlassian.net, other.atlassian.net"
        );
        assert_eq!(
            added_summary("imported", 200, &conn),
            "updated existing connection c_01 (confluence-prod) with the new refresh token"
        );
        let mut hidden = sample_connection();
        hidden["account_id"] = Value::Null;
        hidden["sites"] = json!([]);
        assert_eq!(
            added_summary("imported", 201, &view(hidden)),
            "imported connection c_01 (confluence-prod) for account unknown, 0 site(s)"
        );
    }

    #[test]
    fn events_are_one_line_each_with_their_peer() {
        let events: Vec<Event> = serde_json::from_value(json!([
            {"at": "2025-01-02T03:04:05Z", "kind": "token_read", "message": "3 token reads",
             "node": "n1", "peer": {"uid": 1000, "pid": 42}, "count": 3},
            {"at": "2025-01-02T03:00:00.5Z", "kind": "from_a_newer_daemon", "message": "new",
             "node": null, "peer": null, "count": 1, "extra": true}
        ]))
        .unwrap();
        assert_eq!(
            format_events(&events),
            "2025-01-02T03:04:05Z  token_read                  3  uid 1000 pid 42      3 token reads\n\
             2025-01-02T03:00:00Z  from_a_newer_daemon         1  -                    new\n"
        );
        assert_eq!(format_events(&[]), "no events\n");
    }
}
