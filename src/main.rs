//! The `tokend` binary: everything lives in the library (see [`tokend::cli`]).
//!
//! The one thing done here is adopting a socket passed by systemd (socket activation): it
//! needs `from_raw_fd`, which is `unsafe`, and the library forbids unsafe code.

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

fn main() -> std::process::ExitCode {
    tokend::cli::main(activated_socket())
}

/// The socket systemd passed to this process, if any (`LISTEN_PID` is ours and
/// `LISTEN_FDS` ≥ 1, and the first descriptor is a Unix listening socket).
fn activated_socket() -> Option<std::os::unix::net::UnixListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // SAFETY: systemd's protocol hands this process ownership of descriptors 3.. when
    // LISTEN_PID is its pid; nothing else in this process opened or owns descriptor 3 yet
    // (this runs first thing in main), so adopting it cannot alias another owner.
    let listener = unsafe {
        <std::os::unix::net::UnixListener as std::os::fd::FromRawFd>::from_raw_fd(LISTEN_FDS_START)
    };
    match listener.local_addr() {
        Ok(_) => Some(listener),
        Err(_) => {
            // Not a Unix socket: leave it alone rather than misuse it.
            std::mem::forget(listener);
            None
        }
    }
}
