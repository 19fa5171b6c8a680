//! rtnetlink IO for [`super::netdev`]: dumps (links, routes, addresses, and a peer
//! namespace's addresses by nsid) on a blocking socket, and the event sockets the agent
//! loop waits on. Raw `AF_NETLINK` sockets through libc (we need `recvmsg` control
//! messages for `NETLINK_LISTEN_ALL_NSID`); messages are (de)serialised by
//! `netlink-packet-route`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use ipnetwork::IpNetwork;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::route::RouteType;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::netdev::{Event, HostAddr, HostNet, Link, Peer};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("netlink {op}: {source}")]
    Kernel { op: &'static str, source: io::Error },
}

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NETLINK_LISTEN_ALL_NSID: libc::c_int = 8;
const NETLINK_GET_STRICT_CHK: libc::c_int = 12;
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RECV_BUF: usize = 1 << 16;

/// A raw rtnetlink socket.
struct Sock {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Sock {
    fn open(nonblocking: bool) -> io::Result<Sock> {
        let mut ty = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
        if nonblocking {
            ty |= libc::SOCK_NONBLOCK;
        }
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = cvt(unsafe { libc::socket(libc::AF_NETLINK, ty, libc::NETLINK_ROUTE) })?;
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_nl is valid; we set the family.
        let mut sa: libc::sockaddr_nl = unsafe { zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sa is a valid sockaddr_nl of the given size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_nl>() as u32,
            )
        })?;
        Ok(Sock {
            fd,
            buf: vec![0; RECV_BUF],
        })
    }

    fn set_int(&self, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
        // SAFETY: the option value is a c_int we own for the call.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                opt,
                &v as *const _ as *const libc::c_void,
                size_of::<libc::c_int>() as u32,
            )
        })
        .map(drop)
    }

    fn join(&self, groups: &[u32]) -> io::Result<()> {
        for g in groups {
            self.set_int(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, *g as libc::c_int)?;
        }
        // Bursts of pod churn must not overrun us; as root the limit can be forced.
        let size = 4 << 20;
        if self
            .set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size)
            .is_err()
        {
            self.set_int(libc::SOL_SOCKET, libc::SO_RCVBUF, size)?;
        }
        Ok(())
    }

    fn send(&self, msg: &NetlinkMessage<RouteNetlinkMessage>) -> io::Result<()> {
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        // SAFETY: buf is valid for its length; the kernel is the default destination.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram; with the nsid of its namespace when it came from another one
    /// (`NETLINK_LISTEN_ALL_NSID`). Returns the bytes received.
    fn recv(&mut self) -> io::Result<(usize, Option<i32>)> {
        let mut iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: self.buf.len(),
        };
        // u64 alignment is enough for cmsghdr; room for a few int-sized messages.
        let mut cbuf = [0u64; 8];
        // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
        let mut mh: libc::msghdr = unsafe { zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = size_of::<[u64; 8]>();
        // SAFETY: mh points at valid buffers for the call's duration.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut mh, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut nsid = None;
        // SAFETY: CMSG_* walk the control buffer the kernel just filled, within
        // msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == SOL_NETLINK && (*c).cmsg_type == NETLINK_LISTEN_ALL_NSID {
                    nsid = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const i32));
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        Ok((n as usize, nsid))
    }
}

/// Splits a datagram into messages.
fn messages(mut buf: &[u8]) -> Vec<NetlinkMessage<RouteNetlinkMessage>> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            Ok(m) => out.push(m),
            // A message type or attribute this crate version does not know: not ours.
            Err(e) => tracing::trace!(error = %e, "undecodable netlink message skipped"),
        }
        let aligned = (len + 3) & !3;
        buf = &buf[aligned.min(buf.len())..];
    }
    out
}

/// Decodes one message of our own namespace (`nsid` None) or of a peer namespace.
pub fn decode(msg: RouteNetlinkMessage, nsid: Option<i32>) -> Option<Event> {
    match (msg, nsid) {
        (RouteNetlinkMessage::NewLink(l), None) => Some(Event::Link(link(&l))),
        (RouteNetlinkMessage::DelLink(l), None) => Some(Event::LinkGone(l.header.index)),
        (RouteNetlinkMessage::NewRoute(r), None) => {
            host_route(&r).map(|(ip, oif)| Event::Route { ip, oif })
        }
        (RouteNetlinkMessage::DelRoute(r), None) => {
            host_route(&r).map(|(ip, oif)| Event::RouteGone { ip, oif })
        }
        (RouteNetlinkMessage::NewAddress(a), None) => host_addr(&a).map(Event::Addr),
        (RouteNetlinkMessage::DelAddress(a), None) => host_addr(&a).map(Event::AddrGone),
        (RouteNetlinkMessage::NewAddress(a), Some(nsid)) => {
            peer_addr(&a, nsid).map(|(peer, ip)| Event::PeerAddr { peer, ip })
        }
        (RouteNetlinkMessage::DelAddress(a), Some(nsid)) => {
            peer_addr(&a, nsid).map(|(peer, ip)| Event::PeerAddrGone { peer, ip })
        }
        _ => None,
    }
}

fn link(m: &LinkMessage) -> Link {
    let mut l = Link {
        ifindex: m.header.index,
        name: String::new(),
        kind: None,
        master: None,
        peer: None,
    };
    let (mut peer_index, mut nsid) = (None, None);
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Controller(i) => l.master = Some(*i),
            LinkAttribute::Link(i) => peer_index = Some(*i),
            LinkAttribute::LinkNetNsId(n) => nsid = Some(*n),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(match k {
                            InfoKind::Other(s) => s.clone(),
                            k => k.to_string(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    // Without IFLA_LINK_NETNSID the peer is in our own namespace: not a pod's.
    if let (Some(ifindex), Some(nsid)) = (peer_index, nsid) {
        if nsid >= 0 {
            l.peer = Some(Peer { nsid, ifindex });
        }
    }
    l
}

fn host_route(r: &RouteMessage) -> Option<(IpAddr, u32)> {
    let h = &r.header;
    let full = match h.address_family {
        AddressFamily::Inet => 32,
        AddressFamily::Inet6 => 128,
        _ => return None,
    };
    if h.destination_prefix_length != full || h.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(h.table);
    let (mut dst, mut oif) = (None, None);
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    (table == u32::from(RouteHeader::RT_TABLE_MAIN)).then_some(())?;
    Some((dst?, oif?))
}

fn addr_ip(a: &AddressMessage) -> Option<IpAddr> {
    // IPv4: IFA_LOCAL is the address (IFA_ADDRESS is the peer on point-to-point links).
    let mut address = None;
    for attr in &a.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

fn host_addr(a: &AddressMessage) -> Option<HostAddr> {
    let ip = addr_ip(a)?;
    Some(HostAddr {
        ifindex: a.header.index,
        net: IpNetwork::new(ip, a.header.prefix_len).ok()?,
        global: a.header.scope == AddressScope::Universe,
    })
}

fn peer_addr(a: &AddressMessage, nsid: i32) -> Option<(Peer, IpAddr)> {
    // Link-local and loopback addresses are not pod IPs.
    if a.header.scope != AddressScope::Universe {
        return None;
    }
    let peer = Peer {
        nsid,
        ifindex: a.header.index,
    };
    Some((peer, addr_ip(a)?))
}

/// Request/dump client (blocking, strict checking so that dumps can be filtered and
/// aimed at another namespace).
pub struct Query {
    sock: Sock,
    seq: u32,
}

impl Query {
    pub fn open() -> Result<Query, NetlinkError> {
        let sock = Sock::open(false)?;
        sock.set_int(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)?;
        // A dump never takes this long; a wedged kernel answer must not wedge the agent.
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: tv is a valid timeval for the call.
        cvt(unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                size_of::<libc::timeval>() as u32,
            )
        })?;
        Ok(Query { sock, seq: 0 })
    }

    fn dump(
        &mut self,
        op: &'static str,
        req: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(req));
        msg.finalize();
        self.sock.send(&msg)?;
        let mut out = Vec::new();
        loop {
            let (n, _) = self.sock.recv()?;
            for m in messages(&self.sock.buf[..n]) {
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        let errno = e.code.map_or(0, |c| -c.get());
                        return Err(NetlinkError::Kernel {
                            op,
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
            }
        }
    }

    /// The model of our namespace (links, host routes, addresses) from fresh dumps.
    pub fn host_net(&mut self) -> Result<HostNet, NetlinkError> {
        let mut net = HostNet::default();
        for ev in self.events()? {
            net.apply(ev);
        }
        Ok(net)
    }

    /// Links, host routes and addresses of our namespace, as events.
    fn events(&mut self) -> Result<Vec<Event>, NetlinkError> {
        let mut out = Vec::new();
        let links = self.dump(
            "link dump",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
        )?;
        out.extend(links.into_iter().filter_map(|m| decode(m, None)));
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut a = AddressMessage::default();
            a.header.family = family;
            let addrs = self.dump("address dump", RouteNetlinkMessage::GetAddress(a))?;
            out.extend(addrs.into_iter().filter_map(|m| decode(m, None)));
            let mut r = RouteMessage::default();
            r.header.address_family = family;
            let routes = self.dump("route dump", RouteNetlinkMessage::GetRoute(r))?;
            out.extend(routes.into_iter().filter_map(|m| decode(m, None)));
        }
        Ok(out)
    }

    /// The global addresses of a veth's peer, asked of the peer's namespace by nsid
    /// (`IFA_TARGET_NETNSID`), filtered to the peer's ifindex.
    pub fn peer_addrs(&mut self, peer: Peer) -> Result<Vec<IpAddr>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut a = AddressMessage::default();
            a.header.family = family;
            a.header.index = peer.ifindex;
            a.attributes
                .push(AddressAttribute::TargetNetNsId(peer.nsid));
            let msgs = self.dump("peer address dump", RouteNetlinkMessage::GetAddress(a))?;
            for m in msgs {
                if let RouteNetlinkMessage::NewAddress(a) = m {
                    if let Some((p, ip)) = peer_addr(&a, peer.nsid) {
                        if p == peer {
                            out.push(ip);
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The event sockets: our namespace's links, routes and addresses; and every peer
/// namespace's addresses (`NETLINK_LISTEN_ALL_NSID`).
pub struct Watch {
    host: AsyncFd<Sock>,
    peers: AsyncFd<Sock>,
}

impl Watch {
    /// Subscribes. Open it before taking a [`Query::snapshot`], so that nothing that
    /// happens in between is missed (events repeating the snapshot are harmless).
    pub fn open() -> Result<Watch, NetlinkError> {
        let host = Sock::open(true)?;
        host.join(&[
            RTNLGRP_LINK,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_ROUTE,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV6_IFADDR,
        ])?;
        let peers = Sock::open(true)?;
        peers.set_int(SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)?;
        peers.join(&[RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR])?;
        // SAFETY: each Sock owns its fd and neither replaces nor closes it while the
        // AsyncFd holds it.
        let (host, peers) = unsafe {
            (
                AsyncFd::register_with_interest(host, Interest::READABLE)
                    .map_err(io::Error::from)?,
                AsyncFd::register_with_interest(peers, Interest::READABLE)
                    .map_err(io::Error::from)?,
            )
        };
        Ok(Watch { host, peers })
    }

    /// Waits for events and returns all that are queued, our namespace's first (a link
    /// is always known before its peer's addresses). Cancel-safe: nothing is read before
    /// the wait completes.
    pub async fn next(&mut self) -> Result<Vec<Event>, NetlinkError> {
        loop {
            let mut out = Vec::new();
            tokio::select! {
                g = self.host.readable_mut() => {
                    let mut g = g?;
                    drain(g.get_inner_mut(), false, &mut out);
                    g.clear_ready();
                    drain(self.peers.get_mut(), true, &mut out);
                }
                g = self.peers.readable_mut() => {
                    let mut g = g?;
                    // Our namespace first, even when the peer socket woke us.
                    drain(self.host.get_mut(), false, &mut out);
                    drain(g.get_inner_mut(), true, &mut out);
                    g.clear_ready();
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// Reads until the socket would block.
fn drain(sock: &mut Sock, peers: bool, out: &mut Vec<Event>) {
    loop {
        match sock.recv() {
            Ok((n, nsid)) => {
                // On the peer socket, a message without nsid is our own namespace's
                // (already heard on the host socket).
                if peers && nsid.is_none() {
                    continue;
                }
                let nsid = if peers { nsid } else { None };
                for m in messages(&sock.buf[..n]) {
                    if let NetlinkPayload::InnerMessage(inner) = m.payload {
                        out.extend(decode(inner, nsid));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::warn!("netlink events were lost (socket overrun); resyncing");
                out.push(Event::Overflow);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "netlink receive failed");
                return;
            }
        }
    }
}
