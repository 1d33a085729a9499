//! A fake `$NOTIFY_SOCKET`: a datagram socket in a temporary directory that collects what
//! the daemon sends to systemd.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// A fake `$NOTIFY_SOCKET`: collects what the daemon sends.
pub struct NotifySocket {
    sock: UnixDatagram,
    pub path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    /// Messages received within `window`.
    pub fn collect(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }

    /// Waits for a message starting with `prefix`.
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n]).starts_with(prefix)
            {
                return true;
            }
        }
        false
    }
}
