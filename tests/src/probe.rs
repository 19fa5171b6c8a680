//! In-process servers and clients bound to a namespace, with deadlines.
//!
//! Servers reply with an identity string so a probe proves it reached the
//! intended pod, not just "something answered".

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::NetNs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];
}

/// Why a probe did not get its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// TCP RST or ICMP port unreachable: the path works, nothing listens.
    Refused,
    /// No answer before the deadline (what a policy drop looks like).
    Timeout,
    /// ICMP host/net unreachable or no route.
    Unreachable,
    /// Connected, then reset before the reply arrived.
    Reset,
    Other(String),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Refused => f.write_str("refused"),
            ProbeError::Timeout => f.write_str("timeout"),
            ProbeError::Unreachable => f.write_str("unreachable"),
            ProbeError::Reset => f.write_str("reset"),
            ProbeError::Other(s) => write!(f, "error: {s}"),
        }
    }
}

impl std::error::Error for ProbeError {}

impl From<io::Error> for ProbeError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => return ProbeError::Refused,
            Some(libc::ETIMEDOUT | libc::EAGAIN | libc::EINPROGRESS) => return ProbeError::Timeout,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => return ProbeError::Unreachable,
            Some(libc::ECONNRESET | libc::EPIPE) => return ProbeError::Reset,
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ProbeError::Timeout,
            io::ErrorKind::ConnectionRefused => ProbeError::Refused,
            io::ErrorKind::ConnectionReset => ProbeError::Reset,
            _ => ProbeError::Other(e.to_string()),
        }
    }
}

/// A TCP or UDP server on `[::]:port` (dual stack: serves IPv4 and IPv6)
/// that answers every connection / datagram with its identity. Drop stops
/// the thread and closes the socket.
pub struct Server {
    proto: Proto,
    port: u16,
    hits: Arc<AtomicU64>,
    // Dropping our end wakes the server's poll(): no timeouts, no flags.
    waker: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn tcp(ns: &NetNs, port: u16, ident: &str) -> Result<Server> {
        let listener = ns
            .run(|| TcpListener::bind(wildcard(port)))
            .with_context(|| format!("tcp bind [::]:{port} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        Server::start(Proto::Tcp, port, ident, Sock::Tcp(listener))
    }

    pub fn udp(ns: &NetNs, port: u16, ident: &str) -> Result<Server> {
        let sock = ns
            .run(|| UdpSocket::bind(wildcard(port)))
            .with_context(|| format!("udp bind [::]:{port} in {}", ns.name()))?;
        sock.set_nonblocking(true)?;
        Server::start(Proto::Udp, port, ident, Sock::Udp(sock))
    }

    pub fn new(ns: &NetNs, proto: Proto, port: u16, ident: &str) -> Result<Server> {
        match proto {
            Proto::Tcp => Server::tcp(ns, port, ident),
            Proto::Udp => Server::udp(ns, port, ident),
        }
    }

    fn start(proto: Proto, port: u16, ident: &str, sock: Sock) -> Result<Server> {
        let (waker, wake_rx) = UnixStream::pair()?;
        let hits = Arc::new(AtomicU64::new(0));
        let counter = hits.clone();
        let reply = ident.as_bytes().to_vec();
        // The socket already belongs to the pod netns; the thread need not.
        let thread = std::thread::Builder::new()
            .name(format!("{proto:?}:{port}:{ident}"))
            .spawn(move || serve(sock, wake_rx, &reply, &counter))?;
        Ok(Server {
            proto,
            port,
            hits,
            waker: Some(waker),
            thread: Some(thread),
        })
    }

    pub fn proto(&self) -> Proto {
        self.proto
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted / datagrams answered so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.waker.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Sock {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn wildcard(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)
}

fn serve(sock: Sock, wake: UnixStream, reply: &[u8], hits: &AtomicU64) {
    let fd = match &sock {
        Sock::Tcp(l) => l.as_raw_fd(),
        Sock::Udp(u) => u.as_raw_fd(),
    };
    while wait_readable(fd, wake.as_raw_fd()) {
        match &sock {
            Sock::Tcp(l) => {
                while let Ok((mut s, _)) = l.accept() {
                    hits.fetch_add(1, Ordering::Relaxed);
                    // A stalled client must not wedge the accept loop.
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = s.write_all(reply);
                }
            }
            Sock::Udp(u) => {
                let mut buf = [0u8; 2048];
                while let Ok((_, peer)) = u.recv_from(&mut buf) {
                    hits.fetch_add(1, Ordering::Relaxed);
                    let _ = u.send_to(reply, peer);
                }
            }
        }
    }
}

/// Blocks until `fd` is readable (true) or `wake` is closed (false): how the harness's
/// server and sniffer threads sleep until there is work or they are told to stop.
pub(crate) fn wait_readable(fd: RawFd, wake: RawFd) -> bool {
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfds for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

/// TCP connect from inside `ns`, then read the server's identity.
pub fn tcp_connect(
    ns: &NetNs,
    addr: IpAddr,
    port: u16,
    timeout: Duration,
) -> Result<String, ProbeError> {
    ns.run(|| tcp_exchange(SocketAddr::new(addr, port), timeout))
}

/// UDP request/reply from inside `ns`.
pub fn udp_probe(
    ns: &NetNs,
    addr: IpAddr,
    port: u16,
    timeout: Duration,
) -> Result<String, ProbeError> {
    ns.run(|| udp_exchange(SocketAddr::new(addr, port), timeout))
}

/// Either protocol from inside `ns`.
pub fn probe(
    ns: &NetNs,
    proto: Proto,
    to: SocketAddr,
    timeout: Duration,
) -> Result<String, ProbeError> {
    ns.run(|| exchange(proto, to, timeout))
}

/// Attempts a probe that should get through makes before it counts as failed.
pub const ALLOWED_ATTEMPTS: usize = 3;

/// A timeout long enough for a busy machine, for the retries of [`expecting_reply`].
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs `attempt` (a probe with the given timeout) for a probe the test expects to get
/// through: a timeout is tried again with [`RETRY_TIMEOUT`], up to [`ALLOWED_ATTEMPTS`] in
/// all. On a loaded machine a probe can lose to the scheduler (or to IPv6 address setup),
/// while retrying never lets a denied packet through — so retries forgive slowness only,
/// and probes expected to fail are never retried.
pub fn expecting_reply(
    timeout: Duration,
    mut attempt: impl FnMut(Duration) -> Result<String, ProbeError>,
) -> Result<String, ProbeError> {
    let mut r = attempt(timeout);
    for _ in 1..ALLOWED_ATTEMPTS {
        if r != Err(ProbeError::Timeout) {
            break;
        }
        r = attempt(timeout.max(RETRY_TIMEOUT));
    }
    r
}

/// [`exchange`] for a probe expected to get through (see [`expecting_reply`]).
pub fn exchange_expecting_reply(
    proto: Proto,
    to: SocketAddr,
    timeout: Duration,
) -> Result<String, ProbeError> {
    expecting_reply(timeout, |t| exchange(proto, to, t))
}

/// Probe from the calling thread's current netns (for threads that already
/// entered one, e.g. matrix workers).
pub fn exchange(proto: Proto, to: SocketAddr, timeout: Duration) -> Result<String, ProbeError> {
    match proto {
        Proto::Tcp => tcp_exchange(to, timeout),
        Proto::Udp => udp_exchange(to, timeout),
    }
}

/// TCP connect + read-to-EOF in the calling thread's netns, all within
/// `timeout`.
pub fn tcp_exchange(to: SocketAddr, timeout: Duration) -> Result<String, ProbeError> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply)
}

/// UDP request/reply in the calling thread's netns. Re-sends every 200 ms
/// until `timeout`, so one lost datagram is not a "denied". A connected
/// socket turns ICMP port unreachable into ECONNREFUSED (= Refused).
pub fn udp_exchange(to: SocketAddr, timeout: Duration) -> Result<String, ProbeError> {
    let local: IpAddr = match to {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    udp_exchange_from(local, to, timeout)
}

/// [`udp_exchange`] from the local address `from`.
pub fn udp_exchange_from(
    from: IpAddr,
    to: SocketAddr,
    timeout: Duration,
) -> Result<String, ProbeError> {
    let deadline = Instant::now() + timeout;
    let s = UdpSocket::bind(SocketAddr::new(from, 0))?;
    udp_exchange_on(&s, to, deadline)
}

/// [`udp_exchange`] on the already bound socket `s`, until `deadline`.
pub fn udp_exchange_on(
    s: &UdpSocket,
    to: SocketAddr,
    deadline: Instant,
) -> Result<String, ProbeError> {
    s.connect(to)?;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProbeError::Timeout);
        }
        s.send(b"probe")?;
        s.set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
        match s.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => match ProbeError::from(e) {
                ProbeError::Timeout => continue,
                other => return Err(other),
            },
        }
    }
}

/// One attempt of a [`Prober`].
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Start of the attempt, relative to the prober's start.
    pub at: Duration,
    pub latency: Duration,
    pub result: Result<String, ProbeError>,
}

/// What a [`Prober`] saw so far.
#[derive(Debug, Clone, Default)]
pub struct ProbeLog {
    pub attempts: Vec<Attempt>,
}

impl ProbeLog {
    pub fn successes(&self) -> usize {
        self.attempts.iter().filter(|a| a.result.is_ok()).count()
    }

    pub fn failures(&self) -> usize {
        self.attempts.len() - self.successes()
    }

    /// Failed attempts with their error.
    pub fn failed(&self) -> impl Iterator<Item = (Duration, &ProbeError)> {
        self.attempts
            .iter()
            .filter_map(|a| a.result.as_ref().err().map(|e| (a.at, e)))
    }

    /// Longest span from a failed attempt's start to the next success's
    /// start (or the last attempt, if it never recovered): how long clients
    /// would have seen the service down.
    pub fn longest_outage(&self) -> Duration {
        let mut worst = Duration::ZERO;
        let mut down_since: Option<Duration> = None;
        for a in &self.attempts {
            match (&a.result, down_since) {
                (Err(_), None) => down_since = Some(a.at),
                (Ok(_), Some(t)) => {
                    worst = worst.max(a.at - t);
                    down_since = None;
                }
                _ => {}
            }
        }
        if let (Some(t), Some(last)) = (down_since, self.attempts.last()) {
            worst = worst.max(last.at + last.latency - t);
        }
        worst
    }

    /// Attempts from the `i`-th on (e.g. `snapshot().attempts.len()` taken
    /// before an event).
    pub fn since_index(&self, i: usize) -> ProbeLog {
        ProbeLog {
            attempts: self.attempts.get(i..).unwrap_or_default().to_vec(),
        }
    }

    /// Attempts that started after `t` (relative to the prober's start).
    pub fn since(&self, t: Duration) -> ProbeLog {
        ProbeLog {
            attempts: self
                .attempts
                .iter()
                .filter(|a| a.at >= t)
                .cloned()
                .collect(),
        }
    }
}

/// A background thread in a pod netns making one TCP request every
/// `interval` (or back-to-back when attempts take longer), recording each.
/// For "does traffic survive an agent restart" tests.
pub struct Prober {
    started: Instant,
    log: Arc<Mutex<ProbeLog>>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Prober {
    pub fn start(
        ns: &NetNs,
        to: SocketAddr,
        interval: Duration,
        attempt_timeout: Duration,
    ) -> Result<Prober> {
        let log = Arc::new(Mutex::new(ProbeLog::default()));
        let (stop, stopped) = mpsc::channel::<()>();
        let started = Instant::now();
        let sink = log.clone();
        let thread = ns.spawn(move || loop {
            let t0 = Instant::now();
            let result = tcp_exchange(to, attempt_timeout);
            let attempt = Attempt {
                at: t0 - started,
                latency: t0.elapsed(),
                result,
            };
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .attempts
                .push(attempt);
            // Pacing doubles as the stop signal: wakes at once on stop/drop.
            let pause = interval.saturating_sub(t0.elapsed());
            match stopped.recv_timeout(pause) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        })?;
        Ok(Prober {
            started,
            log,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// When the prober started; `Attempt::at` is relative to this.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn snapshot(&self) -> ProbeLog {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until `cond` holds on the log so far, or `timeout` passes.
    pub fn wait_for(&self, timeout: Duration, mut cond: impl FnMut(&ProbeLog) -> bool) -> bool {
        crate::util::wait_until(timeout, || {
            cond(&self.log.lock().unwrap_or_else(|e| e.into_inner()))
        })
    }

    /// Stops the thread (after its in-flight attempt) and returns the log.
    pub fn stop(mut self) -> ProbeLog {
        self.halt();
        self.snapshot()
    }

    fn halt(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, ok: bool) -> Attempt {
        Attempt {
            at: Duration::from_millis(ms),
            latency: Duration::from_millis(1),
            result: if ok {
                Ok("x".into())
            } else {
                Err(ProbeError::Timeout)
            },
        }
    }

    #[test]
    fn longest_outage_spans_failure_to_recovery() {
        let log = ProbeLog {
            attempts: vec![
                at(0, true),
                at(10, false),
                at(20, false),
                at(50, true),
                at(60, false),
            ],
        };
        assert_eq!(log.successes(), 2);
        assert_eq!(log.failures(), 3);
        assert_eq!(log.longest_outage(), Duration::from_millis(40));
        assert_eq!(log.since(Duration::from_millis(50)).attempts.len(), 2);
    }

    #[test]
    fn errno_mapping() {
        let e = |n| ProbeError::from(io::Error::from_raw_os_error(n));
        assert_eq!(e(libc::ECONNREFUSED), ProbeError::Refused);
        assert_eq!(e(libc::EAGAIN), ProbeError::Timeout);
        assert_eq!(e(libc::EHOSTUNREACH), ProbeError::Unreachable);
        assert_eq!(e(libc::ECONNRESET), ProbeError::Reset);
    }
}
