//! Counting the TCP and UDP packets that cross one interface, with an AF_PACKET socket
//! bound to it: "how many denied packets did the client send" (its eth0, outgoing) and "how
//! many of them arrived" (the server's eth0, incoming), independent of any counter Palisade
//! keeps. Only TCP and UDP count: neighbour discovery between the same addresses is
//! link-level control that Palisade passes on purpose.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::cni::ifindex_in;
use crate::netns::NetNs;
use crate::probe::wait_readable;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Counts TCP and UDP frames on an interface whose IP (source, destination) is one of the
/// given pairs.
/// Drop stops the thread.
pub struct Sniffer {
    matched: Arc<AtomicU64>,
    kernel_drops: Arc<AtomicU64>,
    waker: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl Sniffer {
    /// Starts counting on `ifname` inside `ns` the TCP/UDP packets from `src` to `dst` of
    /// any listed pair, in either direction of the interface.
    pub fn start(ns: &NetNs, ifname: &str, pairs: &[(IpAddr, IpAddr)]) -> Result<Sniffer> {
        let ifindex = ifindex_in(ns, ifname)
            .with_context(|| format!("no interface {ifname} in {}", ns.name()))?;
        let sock = ns
            .run(|| packet_socket(ifindex))
            .with_context(|| format!("AF_PACKET socket on {ifname} in {}", ns.name()))?;
        let pairs: BTreeSet<(IpAddr, IpAddr)> = pairs.iter().copied().collect();
        let (waker, wake_rx) = UnixStream::pair()?;
        let matched = Arc::new(AtomicU64::new(0));
        let kernel_drops = Arc::new(AtomicU64::new(0));
        let (m, d) = (matched.clone(), kernel_drops.clone());
        let thread = std::thread::Builder::new()
            .name(format!("sniff:{ifname}"))
            .spawn(move || sniff(sock, wake_rx, &pairs, &m, &d))?;
        Ok(Sniffer {
            matched,
            kernel_drops,
            waker: Some(waker),
            thread: Some(thread),
        })
    }

    /// Matching packets counted so far.
    pub fn count(&self) -> u64 {
        self.matched.load(Ordering::Relaxed)
    }

    /// Stops after reading every frame already queued to the socket; returns the final
    /// count. Fails when the socket lost frames (the count would be a lower bound only).
    pub fn stop(mut self) -> Result<u64> {
        self.halt();
        let drops = self.kernel_drops.load(Ordering::Relaxed);
        if drops > 0 {
            bail!("the sniffer's socket dropped {drops} frames: counts are not exact");
        }
        Ok(self.count())
    }

    fn halt(&mut self) {
        drop(self.waker.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.halt();
    }
}

fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // A roomy queue: the thread may be descheduled while a test sprays packets.
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt with a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid initial value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind with a sockaddr_ll of the size we pass.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn sniff(
    sock: OwnedFd,
    wake: UnixStream,
    pairs: &BTreeSet<(IpAddr, IpAddr)>,
    matched: &AtomicU64,
    kernel_drops: &AtomicU64,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let woken = !wait_readable(sock.as_raw_fd(), wake.as_raw_fd());
        // Drain what is queued, also after the stop signal: frames that crossed the
        // interface before the caller stopped us are counted.
        loop {
            // SAFETY: recv into a buffer we own, of the length we pass.
            let n = unsafe {
                libc::recv(
                    sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            if let Some(pair) = ip_pair(&buf[..n as usize]) {
                if pairs.contains(&pair) {
                    matched.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        kernel_drops.fetch_add(take_drops(sock.as_raw_fd()), Ordering::Relaxed);
        if woken {
            return;
        }
    }
}

/// (source, destination) of an Ethernet frame carrying TCP or UDP directly over IPv4 or
/// IPv6 (the harness's traffic has no IPv6 extension headers).
fn ip_pair(frame: &[u8]) -> Option<(IpAddr, IpAddr)> {
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let ip = frame.get(14..)?;
    let (proto, pair) = match ethertype {
        ETH_P_IP => {
            let s: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (*ip.get(9)?, (IpAddr::from(s), IpAddr::from(d)))
        }
        ETH_P_IPV6 => {
            let s: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (*ip.get(6)?, (IpAddr::from(s), IpAddr::from(d)))
        }
        _ => return None,
    };
    matches!(proto, 6 | 17).then_some(pair)
}

/// Frames the kernel dropped because the socket's queue was full, since the last call.
fn take_drops(fd: i32) -> u64 {
    // struct tpacket_stats { unsigned int tp_packets; unsigned int tp_drops; }
    let mut stats = [0u32; 2];
    let mut len = std::mem::size_of_val(&stats) as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of the length we pass; reading resets the stats.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            stats.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc == 0 {
        u64::from(stats[1])
    } else {
        0
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_pairs_of_both_families() {
        let mut f = vec![0u8; 14 + 40];
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        f[14 + 9] = 6;
        f[14 + 12..14 + 16].copy_from_slice(&[198, 18, 1, 2]);
        f[14 + 16..14 + 20].copy_from_slice(&[198, 18, 1, 3]);
        assert_eq!(
            ip_pair(&f),
            Some(("198.18.1.2".parse().unwrap(), "198.18.1.3".parse().unwrap()))
        );
        f[14 + 9] = 1;
        assert_eq!(ip_pair(&f), None, "ICMP does not count");
        f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        f[14 + 6] = 17;
        let s: std::net::Ipv6Addr = "fd00:198:18:1::2".parse().unwrap();
        let d: std::net::Ipv6Addr = "fd00:198:18:1::3".parse().unwrap();
        f[14 + 8..14 + 24].copy_from_slice(&s.octets());
        f[14 + 24..14 + 40].copy_from_slice(&d.octets());
        assert_eq!(ip_pair(&f), Some((s.into(), d.into())));
        f[14 + 6] = 58;
        assert_eq!(ip_pair(&f), None, "neighbour discovery does not count");
        f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(ip_pair(&f), None);
        assert_eq!(ip_pair(&f[..10]), None);
    }
}
