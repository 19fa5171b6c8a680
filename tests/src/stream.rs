//! Long-lived traffic for "does this survive X" tests: an echo server, a TCP connection
//! that keeps exchanging numbered chunks with it, and a sprayer of attempts that must all
//! go unanswered (denied traffic).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::NetNs;
use crate::probe::wait_readable;
use crate::probe::Proto;

/// A TCP echo server on `[::]:port` (both families) that records every peer it accepted.
pub struct EchoServer {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    waker: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &NetNs, port: u16) -> Result<EchoServer> {
        let listener = ns
            .run(|| TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)))
            .with_context(|| format!("echo bind [::]:{port} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let (waker, wake_rx) = UnixStream::pair()?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peers.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("echo:{port}"))
            .spawn(move || accept_loop(listener, wake_rx, &p, &s))?;
        Ok(EchoServer {
            peers,
            stop,
            waker: Some(waker),
            thread: Some(thread),
        })
    }

    /// Every peer accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Connections accepted from `ip`.
    pub fn accepted_from(&self, ip: IpAddr) -> usize {
        self.peers()
            .iter()
            .filter(|p| canonical(p.ip()) == canonical(ip))
            .count()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.waker.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A v4-mapped v6 address as the v4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(a)),
        v4 => v4,
    }
}

fn accept_loop(
    listener: TcpListener,
    wake: UnixStream,
    peers: &Mutex<Vec<SocketAddr>>,
    stop: &Arc<AtomicBool>,
) {
    let mut conns = Vec::new();
    while wait_readable(listener.as_raw_fd(), wake.as_raw_fd()) {
        while let Ok((s, peer)) = listener.accept() {
            peers.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
            let stop = stop.clone();
            if let Ok(t) = std::thread::Builder::new()
                .name("echo-conn".into())
                .spawn(move || echo(s, &stop))
            {
                conns.push(t);
            }
        }
    }
    for t in conns {
        let _ = t.join();
    }
}

fn echo(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    // Bounded reads so a stopped server does not wait for an idle client forever.
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}
/// One connect + echo round trip from the calling thread's netns: a fresh allowed
/// connection works end to end.
pub fn echo_once(to: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let msg = b"palisade-echo";
    s.write_all(msg)?;
    let mut back = [0u8; 13];
    s.read_exact(&mut back)?;
    if &back != msg {
        return Err(io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// What a [`Stream`] saw.
#[derive(Debug, Clone, Default)]
pub struct StreamReport {
    /// Chunks sent and received back intact.
    pub round_trips: u64,
    /// Bytes sent plus bytes received.
    pub bytes: u64,
    /// The error that ended the connection, if one did.
    pub error: Option<String>,
    /// Longest time between two completed round trips (a figure, not an assertion).
    pub longest_gap: Duration,
    /// Segments the kernel retransmitted on this connection (TCP_INFO), a figure.
    pub retransmits: u32,
}

/// One TCP connection that keeps exchanging numbered chunks with an [`EchoServer`] until
/// stopped; any error, short read or corrupted echo ends it and is reported.
pub struct Stream {
    round_trips: Arc<AtomicU64>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<StreamReport>>,
}

impl Stream {
    /// Connects from inside `ns` (fails if the connection cannot be made) and starts the
    /// exchange, one chunk every `interval`.
    pub fn start(ns: &NetNs, to: SocketAddr, interval: Duration) -> Result<Stream> {
        let conn = ns
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
            .with_context(|| format!("stream connect to {to}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.set_write_timeout(Some(Duration::from_secs(5)))?;
        conn.set_nodelay(true)?;
        let round_trips = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = mpsc::channel::<()>();
        let rt = round_trips.clone();
        let thread = std::thread::Builder::new()
            .name(format!("stream:{to}"))
            .spawn(move || exchange(conn, interval, &rt, &stopped))?;
        Ok(Stream {
            round_trips,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Stops after the round trip in flight, closes the connection, returns the report.
    pub fn stop(mut self) -> StreamReport {
        self.halt()
    }

    fn halt(&mut self) -> StreamReport {
        drop(self.stop.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => StreamReport {
                error: Some("stream thread panicked".into()),
                ..Default::default()
            },
            None => StreamReport::default(),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.halt();
    }
}

fn exchange(
    mut conn: TcpStream,
    interval: Duration,
    round_trips: &AtomicU64,
    stopped: &mpsc::Receiver<()>,
) -> StreamReport {
    let mut report = StreamReport::default();
    let mut last = Instant::now();
    let mut seq: u64 = 0;
    let mut chunk = [0u8; 64];
    let mut back = [0u8; 64];
    loop {
        seq += 1;
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (seq as u8).wrapping_add(i as u8);
        }
        chunk[..8].copy_from_slice(&seq.to_be_bytes());
        let r = conn
            .write_all(&chunk)
            .and_then(|_| conn.read_exact(&mut back));
        match r {
            Ok(()) if back == chunk => {
                report.round_trips += 1;
                report.bytes += 2 * chunk.len() as u64;
                round_trips.store(report.round_trips, Ordering::Relaxed);
                report.longest_gap = report.longest_gap.max(last.elapsed());
                last = Instant::now();
            }
            Ok(()) => {
                report.error = Some(format!("corrupted echo of chunk {seq}"));
                break;
            }
            Err(e) => {
                report.error = Some(format!("chunk {seq}: {e}"));
                break;
            }
        }
        match stopped.recv_timeout(interval) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => break,
        }
    }
    report.retransmits = total_retrans(&conn);
    report
}

/// `tcpi_total_retrans` of a connection.
fn total_retrans(s: &TcpStream) -> u32 {
    // SAFETY: tcp_info is plain data; getsockopt fills at most `len` bytes of it.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        if libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        ) == 0
        {
            info.tcpi_total_retrans
        } else {
            0
        }
    }
}

/// What a [`Sprayer`] did.
#[derive(Debug, Clone, Default)]
pub struct SprayReport {
    /// Connection attempts / datagrams sent, per target, in target order.
    pub attempts: Vec<u64>,
    /// Attempts that got any answer (a connection, a reply, a refusal): each one is a
    /// denied packet that reached the target.
    pub answered: Vec<String>,
}

/// A thread in a namespace that keeps trying targets that must stay unreachable: a TCP
/// connect (one SYN, given up before the kernel retransmits) or a UDP datagram per target
/// per round, recording any answer.
pub struct Sprayer {
    rounds: Arc<AtomicU64>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<SprayReport>>,
}

/// A TCP connect gives up after this, well before the SYN would be retransmitted (1 s).
const SYN_WAIT: Duration = Duration::from_millis(50);

impl Sprayer {
    pub fn start(ns: &NetNs, targets: &[(Proto, SocketAddr)], interval: Duration) -> Result<Self> {
        let targets = targets.to_vec();
        let rounds = Arc::new(AtomicU64::new(0));
        let r = rounds.clone();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = ns.spawn(move || spray(&targets, interval, &r, &stopped))?;
        Ok(Sprayer {
            rounds,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Rounds completed (each round tries every target once).
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> SprayReport {
        self.halt()
    }

    fn halt(&mut self) -> SprayReport {
        drop(self.stop.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => SprayReport {
                answered: vec!["sprayer thread panicked".into()],
                ..Default::default()
            },
            None => SprayReport::default(),
        }
    }
}

impl Drop for Sprayer {
    fn drop(&mut self) {
        self.halt();
    }
}

fn spray(
    targets: &[(Proto, SocketAddr)],
    interval: Duration,
    rounds: &AtomicU64,
    stopped: &mpsc::Receiver<()>,
) -> SprayReport {
    let mut report = SprayReport {
        attempts: vec![0; targets.len()],
        answered: Vec::new(),
    };
    let udp4 = UdpSocket::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
    let udp6 = UdpSocket::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0));
    for s in [&udp4, &udp6].into_iter().flatten() {
        let _ = s.set_nonblocking(true);
    }
    loop {
        for (i, (proto, to)) in targets.iter().enumerate() {
            report.attempts[i] += 1;
            match proto {
                Proto::Tcp => match TcpStream::connect_timeout(to, SYN_WAIT) {
                    Ok(_) => report.answered.push(format!("tcp {to}: connected")),
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                        report.answered.push(format!("tcp {to}: refused"))
                    }
                    Err(_) => {}
                },
                Proto::Udp => {
                    let sock = if to.is_ipv4() { &udp4 } else { &udp6 };
                    if let Ok(s) = sock {
                        let _ = s.send_to(b"denied?", to);
                    }
                }
            }
        }
        // Any datagram (or ICMP error surfacing as an error) that came back is an answer.
        for s in [&udp4, &udp6].into_iter().flatten() {
            let mut buf = [0u8; 64];
            loop {
                match s.recv_from(&mut buf) {
                    Ok((_, from)) => report.answered.push(format!("udp reply from {from}")),
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                        report.answered.push("udp: port unreachable".into())
                    }
                    Err(_) => break,
                }
            }
        }
        rounds.fetch_add(1, Ordering::Relaxed);
        match stopped.recv_timeout(interval) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return report,
        }
    }
}
