//! systemd integration without libsystemd: `sd_notify` datagrams and the watchdog period.
//!
//! Messages go to `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`); without
//! it every call is a no-op, so the daemon runs the same outside systemd. Socket activation
//! (`LISTEN_FDS`) is taken in `main.rs`, the only place allowed to adopt a raw descriptor.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A handle on systemd's notification socket.
pub struct SdNotify {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl SdNotify {
    /// Reads `$NOTIFY_SOCKET`; a missing or unusable socket gives a no-op handle.
    pub fn from_env() -> SdNotify {
        SdNotify::from_value(std::env::var_os("NOTIFY_SOCKET"))
    }

    /// A handle for a `$NOTIFY_SOCKET` value (`None` or empty: a no-op handle).
    fn from_value(value: Option<std::ffi::OsString>) -> SdNotify {
        let target = value.filter(|v| !v.is_empty()).and_then(|raw| {
            let raw = raw.into_encoded_bytes();
            let addr = if let Some(name) = raw.strip_prefix(b"@") {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name).ok()?
            } else {
                SocketAddr::from_pathname(std::path::Path::new(std::str::from_utf8(&raw).ok()?))
                    .ok()?
            };
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, addr))
        });
        SdNotify { target }
    }

    /// Whether systemd is listening.
    #[cfg(test)]
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.target
            && let Err(e) = sock.send_to_addr(msg.as_bytes(), addr)
        {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }

    /// `READY=1`: the socket serves.
    pub fn ready(&self) {
        self.send("READY=1\nSTATUS=serving");
    }

    /// `RELOADING=1` with the monotonic timestamp systemd ≥ 253 expects.
    pub fn reloading(&self) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading configuration"
        ));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// `WATCHDOG=1`: send only while healthy.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, if it is meant for this
/// process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = SdNotify {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
        };
        n.ready();
        n.reloading();
        n.watchdog();
        let mut buf = [0u8; 256];
        let got: Vec<String> = (0..3)
            .map(|_| {
                let k = listener.recv(&mut buf).unwrap();
                String::from_utf8_lossy(&buf[..k]).into_owned()
            })
            .collect();
        assert!(got[0].starts_with("READY=1"), "{got:?}");
        assert!(
            got[1].starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{got:?}"
        );
        assert_eq!(got[2], "WATCHDOG=1");
    }

    #[test]
    fn notify_socket_values_are_parsed_and_a_missing_one_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let by_path = SdNotify::from_value(Some(path.clone().into_os_string()));
        assert!(by_path.enabled());
        by_path.ready();
        let mut buf = [0u8; 64];
        let k = listener
            .recv(&mut buf)
            .expect("the path value reaches the socket");
        assert!(buf[..k].starts_with(b"READY=1"));
        // An abstract name (systemd's usual form) is understood too.
        let name = format!("tokend-test-{}", std::process::id());
        let abstract_listener = {
            use std::os::linux::net::SocketAddrExt;
            let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            UnixDatagram::bind_addr(&addr).unwrap()
        };
        SdNotify::from_value(Some(format!("@{name}").into())).watchdog();
        let k = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"WATCHDOG=1");
        for missing in [None, Some(std::ffi::OsString::new())] {
            let n = SdNotify::from_value(missing);
            assert!(!n.enabled());
            n.ready();
        }
        assert!(
            listener.recv(&mut buf).is_err(),
            "nothing is sent without a socket"
        );
    }
}
