//! A small hand-written HTTP/1.1 client for the Unix socket (so that tests can also send
//! malformed bytes): request building, response parsing (Content-Length and chunked), and
//! connecting as another uid.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

/// A parsed HTTP response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names as received; look them up with [`HttpResponse::header`].
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the status and body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response {} is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// `error.code` of an API error body.
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_slice::<Value>(&self.body)
            .ok()?
            .pointer("/error/code")?
            .as_str()
            .map(str::to_string)
    }
}

/// Serializes a request with `Host`, `Connection: close` and, with a body, `Content-Type`
/// and `Content-Length`.
pub fn build_request(
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let mut out = Vec::new();
    match body {
        Some((ct, bytes)) => {
            head.push_str(&format!(
                "Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                bytes.len()
            ));
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(bytes);
        }
        None => {
            if method != "GET" && method != "HEAD" {
                head.push_str("Content-Length: 0\r\n");
            }
            head.push_str("\r\n");
            out.extend_from_slice(head.as_bytes());
        }
    }
    out
}

/// Writes `req`, calls `after_write`, then reads until a complete response is parsed or EOF.
pub(super) fn exchange<S: Read + Write>(
    mut stream: S,
    req: &[u8],
    after_write: impl FnOnce(&S) -> io::Result<()>,
) -> io::Result<HttpResponse> {
    // A server may answer (and close) before reading everything, e.g. 413: keep going.
    let write_err = stream.write_all(req).and_then(|_| stream.flush()).err();
    if write_err.is_none() {
        let _ = after_write(&stream);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(resp) = parse_response(&buf, false)? {
            return Ok(resp);
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => return Err(write_err.unwrap_or(e)),
        }
    }
    match parse_response(&buf, true)? {
        Some(r) => Ok(r),
        None => Err(write_err.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {} bytes of response", buf.len()),
            )
        })),
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parses a response from `buf`. `Ok(None)` means "incomplete"; with `eof`, a body without
/// length or chunking ends at the end of `buf`.
pub fn parse_response(buf: &[u8], eof: bool) -> io::Result<Option<HttpResponse>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("bad status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let rest = &buf[head_end + 4..];
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    let body = if no_body {
        Vec::new()
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        match dechunk(rest)? {
            Some(b) => b,
            None if eof => return Err(bad("truncated chunked body")),
            None => return Ok(None),
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
        if rest.len() < len {
            if eof {
                return Err(bad(format!(
                    "body truncated: {} of {len} bytes",
                    rest.len()
                )));
            }
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(HttpResponse {
        status,
        headers,
        body,
    }))
}

/// Decodes a chunked body; `Ok(None)` if incomplete.
fn dechunk(mut rest: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&rest[..line_end]).map_err(|_| bad("bad chunk size"))?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| bad(format!("bad chunk size {size_hex:?}")))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers (ignored) end with an empty line.
            return Ok(if rest.windows(2).any(|w| w == b"\r\n") {
                Some(body)
            } else {
                None
            });
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        if &rest[size..size + 2] != b"\r\n" {
            return Err(bad("chunk not followed by CRLF"));
        }
        rest = &rest[size + 2..];
    }
}

/// Connects to the Unix socket `path` as `uid`/`gid` (the test runs as root), so that the
/// daemon sees that peer through SO_PEERCRED: a short-lived thread sets its own effective
/// ids with the raw per-thread `setresgid`/`setresuid` (Linux keeps credentials per thread;
/// the rest of the test process stays root) and connects. The stream is then used from any
/// thread: the peer credentials are those of the connect.
pub fn connect_as(path: &Path, uid: u32, gid: u32) -> io::Result<UnixStream> {
    use rustix::process::{Gid, Uid};
    use rustix::thread::{set_thread_res_gid, set_thread_res_uid};
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        set_thread_res_gid(None::<Gid>, Gid::from_raw(gid), None::<Gid>)?;
        set_thread_res_uid(None::<Uid>, Uid::from_raw(uid), None::<Uid>)?;
        UnixStream::connect(&path)
    })
    .join()
    .expect("the connecting thread does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\n{}",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-a"), Some("b"));
        assert_eq!(r.json(), serde_json::json!({}));

        let partial = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab";
        assert!(parse_response(partial, false).unwrap().is_none());
        assert!(parse_response(partial, true).is_err());

        let chunked =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        let r = parse_response(chunked, false).unwrap().unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.json(), serde_json::json!({"a": 1}));
        assert!(
            parse_response(&chunked[..chunked.len() - 4], false)
                .unwrap()
                .is_none()
        );

        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(r.status, 204);
        assert!(parse_response(b"garbage\r\n\r\n", true).is_err());
    }

    #[test]
    fn client_round_trip_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            s.read_to_end(&mut req).unwrap();
            s.write_all(
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            )
            .unwrap();
            req
        });
        let stream = UnixStream::connect(&path).unwrap();
        let req = build_request(
            "POST",
            "/v1/x",
            "localhost",
            &[],
            Some(("application/json", b"{}")),
        );
        let r = exchange(stream, &req, |s| s.shutdown(std::net::Shutdown::Write)).unwrap();
        assert_eq!((r.status, r.text().as_str()), (201, "ok"));
        let sent = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(sent.starts_with("POST /v1/x HTTP/1.1\r\n"), "{sent}");
        assert!(sent.contains("Content-Length: 2\r\n"), "{sent}");
        assert!(sent.ends_with("\r\n\r\n{}"), "{sent}");
    }
}
