//! The client commands: each one request (or two, for `connect`) to the daemon's socket API,
//! its answer parsed into the wire types of [`crate::wire`] and printed by
//! `cli::output`. stdout carries only the answer; only `token` prints a token.

use std::io::{self, BufRead, IsTerminal, Read, Write};

use hyper::Method;
use serde_json::Value;

use super::output::{
    added_summary, emit, format_events, format_show, pretty, pretty_page, refreshed_summary,
    render_table, table_row,
};
use super::{Failure, MAX_STDIN_BYTES};
use crate::client::{Client, ClientError, encode_component, json_body};
use crate::model::PROVIDER_ATLASSIAN;
use crate::secret::Secret;
use crate::wire::{Connection, Event, NewConnection, Token};

/// The most events `tokend events` asks for (the API's own maximum).
const EVENTS_LIMIT: usize = 1000;

/// How many connections `tokend list` asks for per page (the API's own maximum): it follows
/// the pages' `Link: rel="next"`, so its memory is a page (plus the table's cells), never
/// every connection's JSON at once.
const LIST_PAGE: usize = 1000;

/// A command that talks to the running daemon (every command but `run` and `check-config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientCommand {
    /// `connect`: browser consent.
    Connect {
        /// The new connection's label.
        label: String,
        /// Read the pasted redirect URL instead of listening for it.
        no_browser: bool,
    },
    /// `import`: a refresh token from stdin.
    Import {
        /// The new connection's label.
        label: String,
    },
    /// `list`.
    List {
        /// Print the API's JSON.
        json: bool,
    },
    /// `show ID`.
    Show {
        /// Connection id or label.
        id: String,
        /// Print the API's JSON.
        json: bool,
    },
    /// `token ID` / `token --site HOST`.
    Token(TokenTarget),
    /// `refresh ID`.
    Refresh {
        /// Connection id or label.
        id: String,
    },
    /// `remove ID`.
    Remove {
        /// Connection id or label.
        id: String,
    },
    /// `events ID`.
    Events {
        /// Connection id or label.
        id: String,
        /// Only events at or after this RFC 3339 time.
        since: Option<String>,
        /// Print the API's JSON.
        json: bool,
    },
}

/// `tokend list`: every connection, page by page. `--json` prints the same array as a
/// single answer would be printed, element by element as the pages come.
async fn list(client: &Client, json: bool, out: &mut dyn Write) -> Result<(), Failure> {
    let mut path = format!("/v1/connections?limit={LIST_PAGE}");
    let mut rows = Vec::new();
    let mut wrote = false;
    loop {
        let resp = client.request(Method::GET, &path, None).await?;
        let next = resp.next_link();
        if json {
            let mut text = String::new();
            pretty_page(&resp.body, &mut wrote, &mut text).map_err(|e| resp.invalid_json(&e))?;
            emit(out, &text)?;
        } else {
            let page: Vec<Connection> = resp.json()?;
            rows.extend(page.iter().map(table_row));
        }
        match next {
            // A daemon that does not page answers everything at once, without a link.
            Some(next) if next != path => path = next,
            _ => break,
        }
    }
    if json {
        return emit(out, if wrote { "\n]\n" } else { "[]\n" });
    }
    emit(out, &render_table(rows))
}

/// Whose token `tokend token` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenTarget {
    /// A connection, by id or label.
    Id(String),
    /// The active connection reaching a site (host or cloud id).
    Site(String),
}

/// Runs one client command against the daemon, writing its answer to `out`.
pub async fn client_command(
    command: ClientCommand,
    client: &Client,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    match command {
        ClientCommand::Connect { label, no_browser } => {
            super::connect::connect(client, &label, no_browser, out).await
        }
        ClientCommand::Import { label } => {
            let stdin = io::stdin();
            let interactive = stdin.is_terminal();
            if interactive {
                eprint!("Paste the refresh token for {label:?} and press Enter: ");
            }
            let token = read_refresh_token(&mut stdin.lock(), interactive)?;
            let body = NewConnection {
                provider: PROVIDER_ATLASSIAN.to_owned(),
                label,
                refresh_token: Some(token),
                code: None,
                state: None,
            };
            add_connection(client, &body, "imported", out).await
        }
        ClientCommand::List { json } => list(client, json, out).await,
        ClientCommand::Show { id, json } => {
            let path = format!("/v1/connections/{}", encode_component(&id));
            let resp = client.request(Method::GET, &path, None).await?;
            if json {
                return emit(out, &format!("{}\n", pretty(&resp.json::<Value>()?)));
            }
            let conn: Connection = resp.json()?;
            emit(out, &format_show(&conn))
        }
        ClientCommand::Token(target) => {
            let path = match target {
                TokenTarget::Id(id) => format!("/v1/connections/{}/token", encode_component(&id)),
                TokenTarget::Site(site) => format!("/v1/token?site={}", encode_component(&site)),
            };
            let resp = match client.request(Method::GET, &path, None).await {
                Ok(resp) => resp,
                Err(
                    err @ ClientError::Api {
                        retry_after: Some(secs),
                        ..
                    },
                ) => return Err(Failure::runtime(format!("{err} (retry after {secs}s)"))),
                Err(err) => return Err(err.into()),
            };
            let token: Token = resp.json()?;
            if token.access_token.is_empty() {
                return Err(Failure::from(ClientError::Protocol(
                    "the answer has no access_token".into(),
                )));
            }
            emit(out, &format!("{}\n", token.access_token.expose()))
        }
        ClientCommand::Refresh { id } => {
            let path = format!("/v1/connections/{}/refresh", encode_component(&id));
            let conn: Connection = client.request(Method::POST, &path, None).await?.json()?;
            emit(out, &refreshed_summary(&conn))
        }
        ClientCommand::Remove { id } => {
            let path = format!("/v1/connections/{}", encode_component(&id));
            client.request(Method::DELETE, &path, None).await?;
            emit(out, &format!("removed {id}\n"))
        }
        ClientCommand::Events { id, since, json } => {
            let mut path = format!(
                "/v1/connections/{}/events?limit={EVENTS_LIMIT}",
                encode_component(&id)
            );
            if let Some(since) = since {
                path.push_str(&format!("&since={}", encode_component(&since)));
            }
            let resp = client.request(Method::GET, &path, None).await?;
            if json {
                return emit(out, &format!("{}\n", pretty(&resp.json::<Value>()?)));
            }
            let events: Vec<Event> = resp.json()?;
            emit(out, &format_events(&events))
        }
    }
}

/// `POST /v1/connections` (an import or a consent) and its one-line answer, `verb` saying
/// how the connection came.
pub(super) async fn add_connection(
    client: &Client,
    body: &NewConnection,
    verb: &str,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let resp = client
        .request(Method::POST, "/v1/connections", Some(json_body(body)?))
        .await?;
    let conn: Connection = resp.json()?;
    emit(
        out,
        &format!("{}\n", added_summary(verb, resp.status, &conn)),
    )
}

/// Reads a refresh token from `input`: one line when typed at a terminal, else everything
/// up to end of file; trimmed. Empty input is refused.
pub fn read_refresh_token(input: &mut dyn BufRead, interactive: bool) -> Result<Secret, Failure> {
    let mut raw = String::new();
    let mut limited = Read::take(input, MAX_STDIN_BYTES + 1);
    let read = if interactive {
        limited.read_line(&mut raw)
    } else {
        limited.read_to_string(&mut raw)
    };
    read.map_err(|e| Failure::runtime(format!("cannot read the refresh token from stdin: {e}")))?;
    if raw.len() as u64 > MAX_STDIN_BYTES {
        return Err(Failure::runtime(format!(
            "more than {MAX_STDIN_BYTES} bytes on stdin: that is not a refresh token"
        )));
    }
    let token = raw.trim();
    if token.is_empty() {
        return Err(Failure::runtime(
            "no refresh token on stdin (pipe it in, e.g. `tokend import --label L < rt.txt`)",
        ));
    }
    Ok(Secret::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::EXIT_RUNTIME;
    use crate::cli::output::tests::sample_connection;
    use parking_lot::Mutex;
    use serde_json::json;
    use std::convert::Infallible;
    use std::sync::Arc;

    #[test]
    fn refresh_token_is_read_trimmed_and_empty_input_refused() {
        let token = read_refresh_token(&mut &b"  rt-abc\n"[..], false).unwrap();
        assert_eq!(token.expose(), "rt-abc");
        // At a terminal, one line is enough.
        let token = read_refresh_token(&mut &b"rt-line\nrest\n"[..], true).unwrap();
        assert_eq!(token.expose(), "rt-line");
        let failure = read_refresh_token(&mut &b" \n\t"[..], false).unwrap_err();
        assert_eq!(failure.code, EXIT_RUNTIME);
        assert!(failure.message.starts_with("no refresh token on stdin"));
        let huge = vec![b'a'; MAX_STDIN_BYTES as usize + 10];
        assert!(read_refresh_token(&mut &huge[..], false).is_err());
    }

    // --- commands against a fake daemon ---------------------------------------------------

    type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

    /// A fake daemon's route: method, path (with query), status, headers, body.
    type Route = (
        &'static str,
        &'static str,
        u16,
        Vec<(&'static str, String)>,
        Value,
    );

    /// A fake daemon answering `(method, path) -> (status, retry_after, body)`.
    async fn fake_daemon(
        routes: Vec<(&'static str, &'static str, u16, Option<u64>, Value)>,
    ) -> (tempfile::TempDir, Client, Seen) {
        let routes = routes
            .into_iter()
            .map(|(m, p, s, retry, body)| {
                let headers = retry
                    .map(|secs| ("retry-after", secs.to_string()))
                    .into_iter()
                    .collect();
                (m, p, s, headers, body)
            })
            .collect();
        fake_daemon_with_headers(routes).await
    }

    /// A fake daemon answering `(method, path) -> (status, headers, body)`.
    async fn fake_daemon_with_headers(routes: Vec<Route>) -> (tempfile::TempDir, Client, Seen) {
        use http_body_util::{BodyExt, Full};
        use hyper::body::{Bytes, Incoming};
        use hyper::{Request, Response};
        use hyper_util::rt::TokioIo;

        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tokend.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let seen: Seen = Arc::default();
        let routes = Arc::new(routes);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, routes) = (seen2.clone(), routes.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (seen, routes) = (seen.clone(), routes.clone());
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let body = String::from_utf8_lossy(&body).to_string();
                        seen.lock().push((method.clone(), path.clone(), body));
                        let route = routes.iter().find(|r| r.0 == method && r.1 == path);
                        let (status, headers, json) = match route {
                            Some((_, _, s, h, j)) => (*s, h.clone(), j.to_string()),
                            None => (
                                404,
                                Vec::new(),
                                r#"{"error":{"code":"not_found","message":"no route"}}"#.into(),
                            ),
                        };
                        let mut resp = Response::builder().status(status);
                        for (name, value) in headers {
                            resp = resp.header(name, value);
                        }
                        let body = if status == 204 { String::new() } else { json };
                        Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(body))).unwrap())
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (dir, Client::new(socket), seen)
    }

    async fn output(command: ClientCommand, client: &Client) -> Result<String, Failure> {
        let mut out = Vec::new();
        client_command(command, client, &mut out).await?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn token_prints_only_the_access_token() {
        let token = json!({
            "connection_id": "c_01", "access_token": "at-123", "token_type": "Bearer",
            "expires_at": "2025-01-02T04:04:05Z", "expires_in": 3600, "scopes": [], "sites": []
        });
        let (_dir, client, seen) = fake_daemon(vec![
            (
                "GET",
                "/v1/connections/conf%20prod/token",
                200,
                None,
                token.clone(),
            ),
            (
                "GET",
                "/v1/token?site=example.atlassian.net",
                200,
                None,
                token,
            ),
        ])
        .await;
        let id = ClientCommand::Token(TokenTarget::Id("conf prod".into()));
        assert_eq!(output(id, &client).await.unwrap(), "at-123\n");
        let site = ClientCommand::Token(TokenTarget::Site("example.atlassian.net".into()));
        assert_eq!(output(site, &client).await.unwrap(), "at-123\n");
        assert_eq!(seen.lock().len(), 2);
    }

    #[tokio::test]
    async fn token_unavailable_reports_retry_after() {
        let (_dir, client, _seen) = fake_daemon(vec![(
            "GET",
            "/v1/connections/c_01/token",
            503,
            Some(30),
            json!({"error": {"code": "provider_unavailable", "message": "Atlassian answered 502"}}),
        )])
        .await;
        let failure = output(
            ClientCommand::Token(TokenTarget::Id("c_01".into())),
            &client,
        )
        .await
        .unwrap_err();
        assert_eq!(failure.code, EXIT_RUNTIME);
        assert_eq!(
            failure.message,
            "provider_unavailable: Atlassian answered 502 (retry after 30s)"
        );
    }

    #[tokio::test]
    async fn import_list_show_refresh_remove_against_the_api() {
        let (_dir, client, seen) = fake_daemon(vec![
            (
                "GET",
                "/v1/connections?limit=1000",
                200,
                None,
                json!([sample_connection()]),
            ),
            (
                "GET",
                "/v1/connections/c_01",
                200,
                None,
                sample_connection(),
            ),
            (
                "POST",
                "/v1/connections/c_01/refresh",
                200,
                None,
                sample_connection(),
            ),
            ("DELETE", "/v1/connections/c_01", 204, None, Value::Null),
        ])
        .await;
        let table = output(ClientCommand::List { json: false }, &client)
            .await
            .unwrap();
        assert!(table.starts_with("ID "), "{table}");
        assert!(table.contains("confluence-prod"), "{table}");
        let listed = output(ClientCommand::List { json: true }, &client)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&listed).unwrap(),
            json!([sample_connection()])
        );
        let shown = output(
            ClientCommand::Show {
                id: "c_01".into(),
                json: false,
            },
            &client,
        )
        .await
        .unwrap();
        assert!(shown.starts_with("id: c_01\n"), "{shown}");
        let refreshed = output(ClientCommand::Refresh { id: "c_01".into() }, &client)
            .await
            .unwrap();
        assert_eq!(
            refreshed,
            "refreshed c_01 (confluence-prod): status active, next rotation 2025-01-09T03:04:05Z\n"
        );
        let removed = output(ClientCommand::Remove { id: "c_01".into() }, &client)
            .await
            .unwrap();
        assert_eq!(removed, "removed c_01\n");
        let failure = output(ClientCommand::Remove { id: "gone".into() }, &client)
            .await
            .unwrap_err();
        assert_eq!(failure.message, "not_found: no route");
        let methods: Vec<String> = seen.lock().iter().map(|s| s.0.clone()).collect();
        assert_eq!(methods, ["GET", "GET", "GET", "POST", "DELETE", "DELETE"]);
    }

    /// `tokend list` follows `Link: rel="next"` through every page, and `--json` prints
    /// exactly what one unpaged answer would have printed.
    #[tokio::test]
    async fn list_follows_the_pages() {
        let mut second = sample_connection();
        second["id"] = json!("c_02");
        second["label"] = json!("jira prod");
        second["extra"] = json!({"a newer daemon's": ["field"]});
        let next = |after: &str| {
            vec![(
                "link",
                format!("</v1/connections?limit=1000&after={after}>; rel=\"next\""),
            )]
        };
        let (_dir, client, seen) = fake_daemon_with_headers(vec![
            (
                "GET",
                "/v1/connections?limit=1000",
                200,
                next("confluence-prod"),
                json!([sample_connection()]),
            ),
            (
                "GET",
                "/v1/connections?limit=1000&after=confluence-prod",
                200,
                next("jira+prod"),
                json!([second.clone()]),
            ),
            (
                "GET",
                "/v1/connections?limit=1000&after=jira+prod",
                200,
                Vec::new(),
                json!([]),
            ),
        ])
        .await;
        let listed = output(ClientCommand::List { json: true }, &client)
            .await
            .unwrap();
        let whole = json!([sample_connection(), second]);
        assert_eq!(listed, format!("{}\n", pretty(&whole)));
        let table = output(ClientCommand::List { json: false }, &client)
            .await
            .unwrap();
        assert_eq!(table.lines().count(), 3, "a header and two rows: {table}");
        assert!(table.contains("c_02"), "{table}");
        assert_eq!(seen.lock().len(), 6, "three pages, twice");
    }

    /// An empty listing prints what it always printed.
    #[tokio::test]
    async fn an_empty_list_prints_an_empty_array() {
        let (_dir, client, _seen) = fake_daemon(vec![(
            "GET",
            "/v1/connections?limit=1000",
            200,
            None,
            json!([]),
        )])
        .await;
        let listed = output(ClientCommand::List { json: true }, &client)
            .await
            .unwrap();
        assert_eq!(listed, "[]\n");
        let table = output(ClientCommand::List { json: false }, &client)
            .await
            .unwrap();
        assert_eq!(table, "no connections\n");
    }
}
