//! `tokend connect`: browser consent (authorization code + `state`). Asks the daemon for an
//! authorize URL, takes the browser's redirect on the loopback `redirect_uri` (or the
//! redirect URL pasted on stdin), checks `state`, and has the daemon exchange the code.
//!
//! The code is a [`Secret`] from the moment it is read until it goes into the request body;
//! the callback page never echoes it.

use std::collections::HashMap;
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use url::{Host, Url};

use super::{Failure, MAX_STDIN_BYTES};
use crate::client::{Client, json_body};
use crate::model::PROVIDER_ATLASSIAN;
use crate::secret::Secret;
use crate::wire::{Authorization, NewAuthorization, NewConnection};

/// How long `connect` waits for the browser's redirect (or a pasted URL). Consent may need a
/// login and a second factor, so minutes, not seconds; the daemon's `state` expires anyway.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long one connection to the loopback callback listener may take to send its request
/// head, so that a stuck local client cannot hold it.
const CALLBACK_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest callback request head read. Atlassian's redirect is well under 2 KiB; the cap only
/// stops a local process from making us buffer without bound.
const MAX_CALLBACK_HEAD: usize = 16 * 1024;

/// Runs the consent flow and has the daemon exchange the code.
pub(super) async fn connect(
    client: &Client,
    label: &str,
    no_browser: bool,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let request = NewAuthorization {
        provider: PROVIDER_ATLASSIAN.to_owned(),
    };
    let auth: Authorization = client
        .request(
            Method::POST,
            "/v1/authorizations",
            Some(json_body(&request)?),
        )
        .await?
        .json()?;
    let redirect = Url::parse(&auth.redirect_uri).map_err(|e| {
        Failure::runtime(format!(
            "the daemon's redirect_uri {:?} is not a URL: {e}",
            auth.redirect_uri
        ))
    })?;

    let listeners = if no_browser {
        Vec::new()
    } else {
        match loopback_addrs(&redirect) {
            None => {
                eprintln!(
                    "tokend: the redirect URI {redirect} is not a loopback http address \
                     this machine can listen on; paste the redirect URL instead."
                );
                Vec::new()
            }
            Some(addrs) => match bind_all(&addrs).await {
                Ok(listeners) => listeners,
                Err(e) => {
                    eprintln!(
                        "tokend: cannot listen on {redirect} ({e}); paste the redirect URL instead."
                    );
                    Vec::new()
                }
            },
        }
    };
    let listening = !listeners.is_empty();
    let stdin_is_tty = io::stdin().is_terminal();

    if listening {
        eprintln!(
            "Opening your browser for Atlassian consent. If it does not open, visit:\n\n  {}\n",
            auth.authorize_url
        );
        open_browser(&auth.authorize_url);
        eprintln!(
            "Waiting up to {} minutes for the browser to come back to {redirect}",
            CALLBACK_TIMEOUT.as_secs() / 60
        );
        if stdin_is_tty {
            eprintln!(
                "(if the browser runs on another machine, paste the address it ends on here and press Enter)"
            );
        }
    } else {
        eprintln!(
            "Visit this URL in a browser and grant access:\n\n  {}\n\n\
             The browser then goes to an address starting with {redirect} (the page may fail \
             to load; that is fine).\nCopy that whole address from the address bar, paste it \
             here and press Enter:",
            auth.authorize_url
        );
    }

    let code = wait_for_redirect(
        listeners,
        &redirect,
        &auth.state,
        !listening || stdin_is_tty,
    )
    .await?;
    let body = NewConnection {
        provider: PROVIDER_ATLASSIAN.to_owned(),
        label: label.to_owned(),
        refresh_token: None,
        code: Some(code),
        state: Some(auth.state),
    };
    super::commands::add_connection(client, &body, "added", out).await
}

/// Where a `connect` redirect came from.
enum RedirectEvent {
    /// A request on the loopback listener, already checked.
    Callback(Result<Secret, Failure>),
    /// A line typed or piped on stdin.
    Pasted(String),
    /// stdin reached end of file without a line.
    StdinClosed,
}

/// Waits for the authorization code: from the loopback listeners, from stdin (when
/// `read_stdin`), whichever comes first, within [`CALLBACK_TIMEOUT`].
async fn wait_for_redirect(
    listeners: Vec<TcpListener>,
    redirect: &Url,
    state: &str,
    read_stdin: bool,
) -> Result<Secret, Failure> {
    let (tx, mut rx) = mpsc::channel::<RedirectEvent>(4);
    let listening = !listeners.is_empty();
    for listener in listeners {
        tokio::spawn(serve_callback(
            listener,
            redirect.clone(),
            state.to_string(),
            tx.clone(),
        ));
    }
    if read_stdin {
        let tx = tx.clone();
        // A plain thread, not spawn_blocking: a blocking stdin read cannot be cancelled, and
        // the runtime would wait for it on shutdown; a detached thread dies with the process.
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = io::stdin()
                .lock()
                .take(MAX_STDIN_BYTES)
                .read_line(&mut line);
            let event = match read {
                Ok(_) if !line.trim().is_empty() => RedirectEvent::Pasted(line),
                _ => RedirectEvent::StdinClosed,
            };
            let _ = tx.blocking_send(event);
        });
    }
    drop(tx);

    let deadline = tokio::time::Instant::now() + CALLBACK_TIMEOUT;
    loop {
        let event = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => {
                return Err(Failure::runtime(format!(
                    "no authorization redirect within {} minutes; run `tokend connect` again",
                    CALLBACK_TIMEOUT.as_secs() / 60
                )));
            }
            Ok(None) => return Err(Failure::runtime("no redirect URL on stdin")),
            Ok(Some(event)) => event,
        };
        match event {
            RedirectEvent::Callback(result) => return result,
            RedirectEvent::Pasted(line) => return parse_redirect(&line, redirect, state),
            RedirectEvent::StdinClosed if listening => continue,
            RedirectEvent::StdinClosed => {
                return Err(Failure::runtime("no redirect URL on stdin"));
            }
        }
    }
}

/// Extracts the authorization code from a redirect URL (absolute, or just its `/path?query`
/// or `?query` part): an `error` parameter is a refusal, `state` must be the one the daemon
/// issued for this run, `code` must be present.
fn parse_redirect(input: &str, redirect: &Url, expected_state: &str) -> Result<Secret, Failure> {
    let input = input.trim();
    if input.is_empty() {
        return Err(Failure::runtime("no redirect URL given"));
    }
    let url = match Url::parse(input) {
        Ok(url) => url,
        Err(_) if input.starts_with('/') || input.starts_with('?') => redirect
            .join(input)
            .map_err(|e| Failure::runtime(format!("the pasted redirect is not a URL: {e}")))?,
        Err(e) => {
            return Err(Failure::runtime(format!(
                "the pasted redirect is not a URL ({e}); paste the whole address starting with {redirect}"
            )));
        }
    };
    let mut params: HashMap<String, String> = HashMap::new();
    for (key, value) in url.query_pairs() {
        params.entry(key.into_owned()).or_insert(value.into_owned());
    }
    if let Some(error) = params.get("error") {
        let description = params
            .get("error_description")
            .map(|d| format!(": {}", printable(d)))
            .unwrap_or_default();
        return Err(Failure::runtime(format!(
            "authorization failed: {}{description}",
            printable(error)
        )));
    }
    match params.get("state") {
        Some(state) if state == expected_state => {}
        Some(_) => {
            return Err(Failure::runtime(
                "state mismatch: this redirect does not belong to this `tokend connect` run; start again",
            ));
        }
        None => {
            return Err(Failure::runtime(format!(
                "the redirect URL has no state parameter; paste the whole address starting with {redirect}"
            )));
        }
    }
    match params.get("code") {
        Some(code) if !code.is_empty() => Ok(Secret::new(code.clone())),
        _ => Err(Failure::runtime(format!(
            "the redirect URL has no code parameter; paste the address the browser was sent to (it starts with {redirect})"
        ))),
    }
}

/// Text from a URL made safe for a terminal: control characters (escape sequences) dropped.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).collect()
}

/// The addresses to listen on for `redirect`, when it is a plain-http loopback URL with a
/// host of exactly `127.0.0.1`, `localhost` or `[::1]`. `localhost` gets both loopbacks,
/// since browsers may resolve it to either.
fn loopback_addrs(redirect: &Url) -> Option<Vec<SocketAddr>> {
    if redirect.scheme() != "http" {
        return None;
    }
    let port = redirect.port_or_known_default()?;
    match redirect.host()? {
        Host::Domain(domain) if domain.eq_ignore_ascii_case("localhost") => Some(vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ]),
        Host::Ipv4(ip) if ip == Ipv4Addr::LOCALHOST => Some(vec![SocketAddr::from((ip, port))]),
        Host::Ipv6(ip) if ip == Ipv6Addr::LOCALHOST => Some(vec![SocketAddr::from((ip, port))]),
        _ => None,
    }
}

/// Binds every address. An address this host lacks (no IPv6) is skipped; one that is in use
/// is an error, since whoever holds it would receive the authorization code.
async fn bind_all(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    let mut last_err = None;
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => listeners.push(listener),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(e) => last_err = Some(e),
        }
    }
    match (listeners.is_empty(), last_err) {
        (true, Some(e)) => Err(e),
        _ => Ok(listeners),
    }
}

/// Answers requests on the loopback listener until one arrives on the redirect path; that
/// one gets a small page and its checked result goes to `tx`. Anything else (favicon, ...)
/// gets a 404.
async fn serve_callback(
    listener: TcpListener,
    redirect: Url,
    state: String,
    tx: mpsc::Sender<RedirectEvent>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let target =
            match tokio::time::timeout(CALLBACK_READ_TIMEOUT, read_request_target(&mut stream))
                .await
            {
                Ok(Some(target)) => target,
                _ => continue,
            };
        let url = match redirect.join(&target) {
            Ok(url) if url.path() == redirect.path() => url,
            _ => {
                respond(&mut stream, "404 Not Found", "Not found.").await;
                continue;
            }
        };
        let result = parse_redirect(url.as_str(), &redirect, &state);
        let page = if result.is_ok() {
            "tokend received the authorization. You can close this tab."
        } else {
            "tokend could not use this authorization; see the terminal. You can close this tab."
        };
        respond(&mut stream, "200 OK", page).await;
        let _ = tx.send(RedirectEvent::Callback(result)).await;
        return;
    }
}

/// Reads an HTTP request head and returns the target of a `GET`, or `None`.
async fn read_request_target(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || head.len() + n > MAX_CALLBACK_HEAD {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.lines().next()?.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Some(target.to_string()),
        _ => None,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, text: &str) {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tokend</title></head>\
         <body><p>{text}</p></body></html>\n"
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{html}",
        html.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Tries to open `url` in the user's browser; failure is fine, the URL is printed anyway.
fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let child = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Ok(mut child) = child {
        // Reap it so that it does not linger as a zombie while we wait for the redirect.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::EXIT_RUNTIME;

    // --- connect: redirect parsing -------------------------------------------------------

    fn redirect() -> Url {
        Url::parse("http://localhost:8976/callback").unwrap()
    }

    #[test]
    fn redirect_yields_the_code_when_state_matches() {
        let code = parse_redirect(
            "http://localhost:8976/callback?code=abc%2F123&state=s-1",
            &redirect(),
            "s-1",
        )
        .unwrap();
        assert_eq!(code.expose(), "abc/123");
        // Surrounding blanks from a paste, and only the query part, are fine.
        let code = parse_redirect("  ?state=s-1&code=xyz\n", &redirect(), "s-1").unwrap();
        assert_eq!(code.expose(), "xyz");
        let code = parse_redirect("/callback?state=s-1&code=q", &redirect(), "s-1").unwrap();
        assert_eq!(code.expose(), "q");
    }

    #[test]
    fn redirect_error_parameter_is_reported() {
        let failure = parse_redirect(
            "http://localhost:8976/callback?error=access_denied&error_description=User%20said%20no%1B%5B31m&state=s-1",
            &redirect(),
            "s-1",
        )
        .unwrap_err();
        assert_eq!(failure.code, EXIT_RUNTIME);
        assert_eq!(
            failure.message,
            "authorization failed: access_denied: User said no[31m"
        );
    }

    #[test]
    fn redirect_state_must_match() {
        let failure = parse_redirect(
            "http://localhost:8976/callback?code=abc&state=other",
            &redirect(),
            "s-1",
        )
        .unwrap_err();
        assert!(
            failure.message.starts_with("state mismatch"),
            "{}",
            failure.message
        );
        let failure = parse_redirect(
            "http://localhost:8976/callback?code=abc",
            &redirect(),
            "s-1",
        )
        .unwrap_err();
        assert!(failure.message.contains("no state"), "{}", failure.message);
    }

    #[test]
    fn redirect_needs_a_code_and_a_url() {
        let failure = parse_redirect(
            "http://localhost:8976/callback?state=s-1",
            &redirect(),
            "s-1",
        )
        .unwrap_err();
        assert!(failure.message.contains("no code"), "{}", failure.message);
        let failure = parse_redirect("just some words", &redirect(), "s-1").unwrap_err();
        assert!(failure.message.contains("not a URL"), "{}", failure.message);
        let failure = parse_redirect("   ", &redirect(), "s-1").unwrap_err();
        assert!(
            failure.message.contains("no redirect URL"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn only_plain_http_loopback_redirects_are_listened_on() {
        let addrs = |u: &str| loopback_addrs(&Url::parse(u).unwrap());
        assert_eq!(
            addrs("http://localhost:8976/callback").unwrap(),
            vec![
                "127.0.0.1:8976".parse::<SocketAddr>().unwrap(),
                "[::1]:8976".parse().unwrap()
            ]
        );
        assert_eq!(
            addrs("http://127.0.0.1:9000/cb").unwrap(),
            vec!["127.0.0.1:9000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            addrs("http://[::1]:9000/cb").unwrap(),
            vec!["[::1]:9000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(addrs("https://localhost:8976/callback"), None);
        assert_eq!(addrs("http://example.com:8976/callback"), None);
        assert_eq!(addrs("http://127.0.0.2:8976/callback"), None);
    }

    #[tokio::test]
    async fn the_loopback_listener_takes_the_redirect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let redirect = Url::parse(&format!("http://127.0.0.1:{port}/callback")).unwrap();
        let waiter = tokio::spawn({
            let redirect = redirect.clone();
            async move { wait_for_redirect(vec![listener], &redirect, "s-1", false).await }
        });
        async fn get(port: u16, target: &str) -> String {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        }
        let favicon = get(port, "/favicon.ico").await;
        assert!(favicon.starts_with("HTTP/1.1 404"), "{favicon}");
        let page = get(port, "/callback?code=the-code&state=s-1").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("close this tab"), "{page}");
        assert!(!page.contains("the-code"), "{page}");
        let code = waiter.await.unwrap().unwrap();
        assert_eq!(code.expose(), "the-code");
    }

    // --- formatting ----------------------------------------------------------------------
}
