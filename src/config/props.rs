//! Property tests of [`Config::parse`]: arbitrary text and structured mutations of the
//! shipped `daemon.toml`. It never panics, every refusal is a [`ConfigError`] naming a key
//! or a line, and no outcome shows the client secret.

use super::*;
use proptest::prelude::*;

const SHIPPED: &str = include_str!("../../daemon.toml");
const FILE: &str = "/etc/tokend/daemon.toml";
const SECRET: &str = "cs-prop-7hQk2VvN9xLm4RtZ8wYp";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(FILE), &|_| Some(SECRET.to_owned()), &|_| {
        Ok(format!("{SECRET}\n"))
    })
}

/// The invariants of any outcome.
fn check(text: &str) -> Result<Result<Config, ConfigError>, TestCaseError> {
    let result = parse(text);
    match &result {
        Ok(c) => {
            let s = c.summary();
            prop_assert!(!s.contains(SECRET), "{s}");
            let debug = format!("{c:?}");
            prop_assert!(!debug.contains(SECRET));
        }
        Err(e) => {
            prop_assert!(e.key.is_some() || e.line.is_some(), "{e}");
            let lines = text.matches('\n').count() + 1;
            prop_assert!(e.line.is_none_or(|l| (1..=lines).contains(&l)), "{e}");
            prop_assert!(e.key.as_ref().is_none_or(|k| !k.is_empty()), "{e:?}");
            prop_assert!(!e.message.is_empty(), "{e:?}");
            let shown = format!("{e} {e:?}");
            prop_assert!(shown.starts_with(FILE), "{shown}");
            prop_assert!(!shown.contains(SECRET), "{shown}");
        }
    }
    // The client's parse (which never reads the secret) agrees, except on what only a read
    // file can tell: the client does not read `ledger.url_file` (`LedgerBackend::Postgres`
    // with no `url`), and this test's files all hold the client secret, which is no URL.
    let client = parse_inner(text, Path::new(FILE), None);
    let url_file_content = result
        .as_ref()
        .err()
        .is_some_and(|e| e.key.as_deref() == Some("ledger.url_file") && client.is_ok());
    prop_assert_eq!(
        result.is_ok() || url_file_content,
        client.is_ok(),
        "{:?} vs {:?}",
        result.as_ref().err(),
        client.err()
    );
    Ok(result)
}

/// A TOML basic string holding `s`.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Values a user might write, right or wrong, for any key.
fn value() -> impl Strategy<Value = String> {
    let words = prop::sample::select(vec![
        "",
        "0s",
        "1ms",
        "1s 500ms",
        "7d",
        "90d",
        "100years",
        "101y",
        "99999999999999999999d",
        "-1s",
        "1.5h",
        "0",
        "0777",
        "01777",
        "0o660",
        "8",
        "778",
        "text",
        "json",
        "JSON",
        "info",
        "info,tokend=debug",
        "tokend[{a=1}]=trace",
        "[{",
        "=",
        "tokend=verbose",
        "0 0 * * * *",
        "0 30 3 * * *",
        "* * * * * * *",
        "60 0 0 31 2 *",
        "*/0 * * * * *",
        "0 0 0 L * *",
        "0 0 0 ? * 7#5",
        "0 0 0 31 2 *",
        "@hourly",
        "1-0 * * * * *",
        "127.0.0.1:0",
        "[::1]:9464",
        "localhost:9464",
        "127.0.0.1",
        "http://x",
        "ftp://x/t",
        "https://",
        "http://[::1",
        "~/x",
        "/",
        "..",
        "a b",
        "offline_access",
        "read:me",
        "state",
        "k",
        "/run/secret",
    ]);
    prop_oneof![
        4 => words.prop_map(quoted),
        2 => "\\PC{0,30}".prop_map(|s| quoted(&s)),
        1 => any::<i64>().prop_map(|i| i.to_string()),
        1 => (0i64..2000).prop_map(|i| i.to_string()),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => any::<f64>().prop_map(|f| f.to_string()),
        2 => prop::collection::vec("[a-z:_ ]{0,16}", 0..4).prop_map(|v| {
            let items: Vec<String> = v.iter().map(|s| quoted(s)).collect();
            format!("[{}]", items.join(", "))
        }),
        1 => prop::collection::vec(any::<i64>(), 0..3).prop_map(|v| format!("{v:?}")),
        1 => prop::sample::select(vec![
            "{}", "{ x = 1 }", "1979-05-27T07:32:00Z", "[[]]", "'lit'", "'''multi\nline'''",
            "\"\"\"\n\"\"\"", "inf", "nan", "0x10", "1_000", "\"unterminated",
        ])
        .prop_map(str::to_owned),
        1 => "\\PC{0,12}",
    ]
}

/// Lines to insert: headers, assignments, garbage.
fn line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "state_dir",
            "socket_path",
            "socket_mode",
            "log_level",
            "key_file",
            "old_key_files",
            "rotate_after",
            "max_concurrent",
            "backoff_min",
            "resolve_sites",
            "command",
            "admin_uids",
            "uid",
            "gid",
            "connections",
            "client_id",
            "client_secret",
            "client_secret_file",
            "scopes",
            "token_url",
            "a.b",
            "\"q\"",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,12}",
    ];
    prop_oneof![
        2 => prop::sample::select(vec![
            "[daemon]", "[refresh]", "[jobs]", "[notify]", "[access]", "[[access.clients]]",
            "[providers]", "[providers.atlassian]", "[providers.github]", "[[daemon]]",
            "[access.clients]", "[ daemon ]", "[\"refresh\"]", "[", "]", "#", "",
        ])
        .prop_map(str::to_owned),
        4 => (key, value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => "\\PC{0,40}",
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    SetValue(usize, String),
    RenameKey(usize, String),
    Delete(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Insert(usize, String),
    InsertChar(usize, usize, char),
    Uncomment(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let i = any::<usize>();
    prop_oneof![
        6 => (i, value()).prop_map(|(i, v)| Mutation::SetValue(i, v)),
        2 => (i, "[a-z_]{1,14}").prop_map(|(i, k)| Mutation::RenameKey(i, k)),
        2 => i.prop_map(Mutation::Delete),
        1 => i.prop_map(Mutation::Duplicate),
        1 => (i, any::<usize>()).prop_map(|(i, j)| Mutation::Swap(i, j)),
        3 => (i, line()).prop_map(|(i, l)| Mutation::Insert(i, l)),
        2 => (i, any::<usize>(), any::<char>()).prop_map(|(i, p, c)| Mutation::InsertChar(i, p, c)),
        1 => i.prop_map(Mutation::Uncomment),
        1 => i.prop_map(Mutation::Truncate),
    ]
}

/// The byte offset of the `=` of an assignment line (`key = value  # comment`).
fn assignment(line: &str) -> Option<usize> {
    let t = line.trim_start();
    if t.starts_with('#') || t.starts_with('[') {
        return None;
    }
    line.find('=')
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for m in mutations {
        let n = lines.len().max(1);
        match m.clone() {
            Mutation::SetValue(i, v) => {
                // A value-bearing line, found from a random start.
                let found = (0..lines.len())
                    .map(|k| (i + k) % n)
                    .find(|&k| assignment(&lines[k]).is_some());
                if let Some(k) = found {
                    let eq = assignment(&lines[k]).unwrap_or(0);
                    lines[k] = format!("{} {v}", &lines[k][..=eq]);
                }
            }
            Mutation::RenameKey(i, key) => {
                let found = (0..lines.len())
                    .map(|k| (i + k) % n)
                    .find(|&k| assignment(&lines[k]).is_some());
                if let Some(k) = found {
                    let eq = assignment(&lines[k]).unwrap_or(0);
                    lines[k] = format!("{key} {}", &lines[k][eq..]);
                }
            }
            Mutation::Delete(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            Mutation::Duplicate(i) if !lines.is_empty() => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            Mutation::Swap(i, j) if !lines.is_empty() => lines.swap(i % n, j % n),
            Mutation::Insert(i, l) => lines.insert(i % (lines.len() + 1), l),
            Mutation::InsertChar(i, p, c) if !lines.is_empty() => {
                let l = &mut lines[i % n];
                let at = l
                    .char_indices()
                    .map(|(b, _)| b)
                    .chain([l.len()])
                    .nth(p % (l.chars().count() + 1))
                    .unwrap_or(0);
                l.insert(at, c);
            }
            Mutation::Uncomment(i) => {
                let found = (0..lines.len())
                    .map(|k| (i + k) % n)
                    .find(|&k| lines[k].trim_start().starts_with('#'));
                if let Some(k) = found {
                    lines[k] = lines[k]
                        .trim_start()
                        .trim_start_matches('#')
                        .trim()
                        .to_owned();
                }
            }
            Mutation::Truncate(i) => {
                let joined = lines.join("\n");
                let mut at = i % (joined.len() + 1);
                while !joined.is_char_boundary(at) {
                    at -= 1;
                }
                lines = joined[..at].lines().map(str::to_owned).collect();
            }
            _ => {}
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// `[a.b]` or `[[a.b]]` (with optional spaces and quotes) → `a.b`: the table a line opens,
/// to name the key a mutation hit.
fn header_name(t: &str) -> Option<String> {
    let rest = t.strip_prefix('[')?;
    let rest = rest.strip_prefix('[').unwrap_or(rest);
    let end = rest.find(']')?;
    Some(
        rest[..end]
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '"' && *c != '\'')
            .collect(),
    )
}

/// The dotted key of the assignment on 0-based line `i` of `text`, from the last header
/// above it (`access.clients[N]` for the N-th `[[access.clients]]`).
fn dotted_key_at(text: &str, i: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let key = lines[i][..assignment(lines[i])?].trim().to_owned();
    let header = lines[..i]
        .iter()
        .rev()
        .find_map(|l| header_name(l.trim_start()))?;
    Some(format!("{header}.{key}"))
}

proptest! {
    #[test]
    fn arbitrary_text(text in "\\PC{0,300}") {
        let _ = check(&text)?;
    }

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = check(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn toml_ish_lines(lines in prop::collection::vec(line(), 0..16)) {
        let _ = check(&lines.join("\n"))?;
    }

    #[test]
    fn mutated_shipped_config(mutations in prop::collection::vec(mutation(), 1..5)) {
        let _ = check(&apply(SHIPPED, &mutations))?;
    }

    /// A value of a type no key takes is refused naming that key and its line.
    #[test]
    fn a_wrongly_typed_value_names_its_key_and_line(
        i in any::<usize>(),
        bad in prop::sample::select(vec!["{ x = 1 }", "1979-05-27T07:32:00Z", "[{}]"]),
    ) {
        let candidates: Vec<usize> = SHIPPED
            .lines()
            .enumerate()
            .filter(|(_, l)| assignment(l).is_some())
            .map(|(k, _)| k)
            .collect();
        let k = candidates[i % candidates.len()];
        let text = apply(SHIPPED, &[Mutation::SetValue(k, bad.to_owned())]);
        let key = dotted_key_at(&text, k).unwrap();
        let e = check(&text)?.err();
        prop_assert!(e.is_some(), "{key} = {bad} accepted");
        let e = e.unwrap();
        prop_assert!(
            e.key.as_deref().is_some_and(|got| got == key || got.starts_with(&format!("{key}["))),
            "{key}: {e}"
        );
        prop_assert_eq!(e.line, Some(k + 1), "{}", e);
    }

    /// An unknown key is refused naming itself and its line.
    #[test]
    fn an_unknown_key_names_itself_and_its_line(i in any::<usize>(), name in "[a-z]{1,6}_x") {
        let candidates: Vec<usize> = SHIPPED
            .lines()
            .enumerate()
            .filter(|(_, l)| assignment(l).is_some())
            .map(|(k, _)| k)
            .collect();
        let k = candidates[i % candidates.len()];
        let text = apply(SHIPPED, &[Mutation::RenameKey(k, name)]);
        let key = dotted_key_at(&text, k).unwrap();
        let e = check(&text)?.err();
        prop_assert!(e.is_some(), "{key} accepted");
        let e = e.unwrap();
        prop_assert_eq!(e.key.as_deref(), Some(key.as_str()), "{}", e);
        prop_assert_eq!(e.line, Some(k + 1), "{}", e);
    }

    /// Whatever parses, with the secret from the file or the environment, its summary
    /// never shows the secret.
    #[test]
    fn summary_never_shows_the_secret(
        mutations in prop::collection::vec(mutation(), 0..3),
        from_file in any::<bool>(),
    ) {
        let mut text = SHIPPED.to_owned();
        if from_file {
            text = text.replace("# client_secret_file = ", "client_secret_file = ");
        }
        let text = apply(&text, &mutations);
        if let Ok(c) = check(&text)? {
            let a = &c.providers.atlassian;
            if let Some(s) = &a.client_secret {
                prop_assert_eq!(s.expose(), SECRET);
            }
            prop_assert!(!c.summary().contains(SECRET));
        }
    }
}

#[test]
fn the_shipped_config_parses() {
    let c = parse(SHIPPED).unwrap();
    assert!(!c.summary().contains(SECRET));
    let text = SHIPPED.replace("# client_secret_file = ", "client_secret_file = ");
    let c = parse(&text).unwrap();
    assert!(matches!(
        c.providers.atlassian.client_secret_source,
        SecretSource::File(_)
    ));
    assert!(!c.summary().contains(SECRET));
}
