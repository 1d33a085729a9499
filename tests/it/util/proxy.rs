//! A TCP proxy between one daemon and PostgreSQL that a test can cut and heal: a partition
//! of that daemon alone, without touching the server or the other daemons. The daemon
//! connects over TCP; the proxy reaches the server on its Unix socket (the test cluster
//! listens on no TCP port, so that its trust authentication reaches no other local user).
//!
//! [`Proxy::cut`] closes every connection through it and refuses new ones (accepted, then
//! closed at once, as a dead route looks to a client with a short timeout: an error, not a
//! hang); [`Proxy::heal`] lets new connections through again. Threads only, no runtime.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A running proxy; stops (and closes its connections) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    /// Cut: close what is open, refuse what comes.
    cut: AtomicBool,
    /// Dropped: the accept loop ends.
    stop: AtomicBool,
    /// Both ends of every open connection, so that a cut can close them.
    open: Mutex<Vec<Box<dyn Fn() + Send>>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to the Unix socket `upstream`.
    pub fn start(upstream: PathBuf) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if s.cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = UnixStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let mut open = s.open.lock().unwrap();
                if let (Ok(c), Ok(u)) = (client.try_clone(), server.try_clone()) {
                    open.push(Box::new(move || {
                        let _ = c.shutdown(Shutdown::Both);
                        let _ = u.shutdown(Shutdown::Both);
                    }));
                }
                drop(open);
                if let (Ok(c1), Ok(c2), Ok(u1), Ok(u2)) = (
                    client.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                    server.try_clone(),
                ) {
                    pump(c1, u1, |c, u| {
                        let _ = c.shutdown(Shutdown::Both);
                        let _ = u.shutdown(Shutdown::Both);
                    });
                    pump(u2, c2, |u, c| {
                        let _ = u.shutdown(Shutdown::Both);
                        let _ = c.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, shared }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection through the proxy and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        for close in self.shared.open.lock().unwrap().drain(..) {
            close();
        }
    }

    /// Lets new connections through again.
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to` on a thread until either side closes, then closes both.
fn pump<A, B>(mut from: A, mut to: B, close: fn(&A, &B))
where
    A: Read + Send + 'static,
    B: Write + Send + 'static,
{
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        close(&from, &to);
    });
}
