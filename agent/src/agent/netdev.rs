//! Which host interface is which local pod's, followed through netlink (no polling, no
//! `ip` processes); the IO is in [`super::links`], this module is the pure state.
//!
//! # The mechanism
//!
//! The agent keeps a model of its network namespace ([`HostNet`]) fed by netlink events:
//!
//! * **links** (`RTNLGRP_LINK`): every interface with its kind, its bridge (master) and,
//!   for a veth or netkit, its peer: the peer's ifindex (`IFLA_LINK`) and the id of the
//!   namespace the peer lives in (`IFLA_LINK_NETNSID`, an nsid the kernel allocates in our
//!   namespace when it reports the link);
//! * **host routes** (`RTNLGRP_IPV4_ROUTE`, `RTNLGRP_IPV6_ROUTE`): /32 and /128 routes of
//!   the main table with their output interface — how routed CNIs (ptp, Calico, Cilium,
//!   kindnet, AWS VPC CNI) send traffic to a pod;
//! * **the peers' addresses**: a second socket set to `NETLINK_LISTEN_ALL_NSID` hears
//!   address events of every namespace that has an nsid here — exactly the namespaces
//!   holding the peers of our veths — each tagged with its nsid in a control message.
//!   When a veth appears (or the agent starts) its peer's addresses are also asked for
//!   directly: an `RTM_GETADDR` dump with `IFA_TARGET_NETNSID` = the peer's nsid, filtered
//!   to the peer's ifindex.
//!
//! A pod IP's host interface is then: the veth that a host route to the IP leaves by
//! (routed CNIs), else the one pod-like interface whose peer holds the IP (bridge CNIs,
//! where the route goes to the bridge; routed CNIs match this way too). Nothing scans the
//! named namespaces, and a pod namespace that `ip netns` does not know is found all the
//! same. Two interfaces whose peers hold the same IP resolve to neither.
//!
//! An interface deleted and created again (same name or not) is a new ifindex: the old
//! one's ENDPOINTS entry and links are removed on `RTM_DELLINK` and the new one is found
//! like any other. A socket overrun (`ENOBUFS`: events were lost) rebuilds the model from
//! dumps.
//!
//! A *pod-like* interface is a veth or netkit whose peer is in another namespace and that
//! carries no global subnet address on our side (an underlay link between namespaces
//! does; a pod's host veth carries none, or a /32 or /128 gateway address as with ptp).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// The other end of a veth: its namespace (an nsid in ours) and its ifindex there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    pub nsid: i32,
    pub ifindex: u32,
}

/// One interface of our namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// `veth`, `bridge`, ... (`IFLA_INFO_KIND`).
    pub kind: Option<String>,
    /// The bridge it is a port of.
    pub master: Option<u32>,
    /// For a veth/netkit whose other end is in another namespace.
    pub peer: Option<Peer>,
}

/// An address of our namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostAddr {
    pub ifindex: u32,
    pub net: IpNetwork,
    /// Global scope (not link-local, not host/loopback).
    pub global: bool,
}

/// What netlink told us, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Link(Link),
    LinkGone(u32),
    /// A /32 or /128 route of the main table and its output interface.
    Route {
        ip: IpAddr,
        oif: u32,
    },
    RouteGone {
        ip: IpAddr,
        oif: u32,
    },
    Addr(HostAddr),
    AddrGone(HostAddr),
    /// A global address on an interface of another namespace.
    PeerAddr {
        peer: Peer,
        ip: IpAddr,
    },
    PeerAddrGone {
        peer: Peer,
        ip: IpAddr,
    },
    /// Events were lost: rebuild from dumps.
    Overflow,
}

/// The agent's model of its namespace's interfaces, routes and the veth peers' addresses.
#[derive(Clone, Debug, Default)]
pub struct HostNet {
    links: BTreeMap<u32, Link>,
    routes: BTreeMap<IpAddr, u32>,
    addrs: BTreeSet<HostAddr>,
    /// Addresses of the peers of our links (only peers some link points at).
    peer_addrs: BTreeMap<Peer, BTreeSet<IpAddr>>,
}

impl HostNet {
    /// Applies one event. Returns a peer whose addresses should be asked for (a link
    /// with a peer we had not seen).
    pub fn apply(&mut self, ev: Event) -> Option<Peer> {
        match ev {
            Event::Link(l) => {
                let new_peer = l.peer.filter(|p| !self.peer_addrs.contains_key(p));
                let old = self.links.insert(l.ifindex, l);
                if let Some(old_peer) = old.and_then(|o| o.peer) {
                    self.forget_peer_if_unused(old_peer);
                }
                if let Some(p) = new_peer {
                    self.peer_addrs.insert(p, BTreeSet::new());
                }
                new_peer
            }
            Event::LinkGone(ifindex) => {
                if let Some(p) = self.links.remove(&ifindex).and_then(|l| l.peer) {
                    self.forget_peer_if_unused(p);
                }
                // The kernel drops the routes and addresses of a gone link without an
                // event for each.
                self.routes.retain(|_, oif| *oif != ifindex);
                self.addrs.retain(|a| a.ifindex != ifindex);
                None
            }
            Event::Route { ip, oif } => {
                self.routes.insert(ip, oif);
                None
            }
            Event::RouteGone { ip, oif } => {
                if self.routes.get(&ip) == Some(&oif) {
                    self.routes.remove(&ip);
                }
                None
            }
            Event::Addr(a) => {
                self.addrs.insert(a);
                None
            }
            Event::AddrGone(a) => {
                self.addrs.remove(&a);
                None
            }
            Event::PeerAddr { peer, ip } => {
                // Only namespaces behind our links matter; others' events are dropped.
                if let Some(set) = self.peer_addrs.get_mut(&peer) {
                    set.insert(ip);
                }
                None
            }
            Event::PeerAddrGone { peer, ip } => {
                if let Some(set) = self.peer_addrs.get_mut(&peer) {
                    set.remove(&ip);
                }
                None
            }
            Event::Overflow => None,
        }
    }

    /// Replaces the addresses known for `peer` (the answer of a direct query).
    pub fn set_peer_addrs(&mut self, peer: Peer, ips: impl IntoIterator<Item = IpAddr>) {
        if let Some(set) = self.peer_addrs.get_mut(&peer) {
            set.extend(ips);
        }
    }

    fn forget_peer_if_unused(&mut self, p: Peer) {
        if !self.links.values().any(|l| l.peer == Some(p)) {
            self.peer_addrs.remove(&p);
        }
    }

    pub fn exists(&self, ifindex: u32) -> bool {
        self.links.contains_key(&ifindex)
    }

    pub fn link(&self, ifindex: u32) -> Option<&Link> {
        self.links.get(&ifindex)
    }

    /// Peers whose addresses are not known yet or should be asked for again.
    pub fn peers(&self) -> impl Iterator<Item = Peer> + '_ {
        self.peer_addrs.keys().copied()
    }

    /// A veth/netkit with its peer in another namespace and no global subnet address on
    /// our side: what a CNI makes for a pod.
    pub fn is_pod_like(&self, ifindex: u32) -> bool {
        let Some(l) = self.links.get(&ifindex) else {
            return false;
        };
        let kind_ok = matches!(l.kind.as_deref(), Some("veth" | "netkit"));
        kind_ok
            && l.peer.is_some()
            && !self.addrs.iter().any(|a| {
                a.ifindex == ifindex && a.global && a.net.prefix() < max_prefix(a.net.ip())
            })
    }

    pub fn pod_like(&self) -> impl Iterator<Item = u32> + '_ {
        self.links.keys().copied().filter(|i| self.is_pod_like(*i))
    }

    /// The pod IPs an interface leads to: its peer's addresses and host routes through it.
    pub fn claims(&self, ifindex: u32) -> BTreeSet<IpAddr> {
        let mut out: BTreeSet<IpAddr> = self
            .links
            .get(&ifindex)
            .and_then(|l| l.peer)
            .and_then(|p| self.peer_addrs.get(&p))
            .cloned()
            .unwrap_or_default();
        out.extend(
            self.routes
                .iter()
                .filter(|(_, oif)| **oif == ifindex)
                .map(|(ip, _)| *ip),
        );
        out
    }

    /// The host interface of a pod IP, if exactly one is known.
    pub fn resolve(&self, ip: IpAddr) -> Option<u32> {
        if let Some(&oif) = self.routes.get(&ip) {
            if self.is_pod_like(oif) {
                return Some(oif);
            }
        }
        let mut found = self.links.values().filter(|l| {
            l.peer
                .and_then(|p| self.peer_addrs.get(&p))
                .is_some_and(|ips| ips.contains(&ip))
                && self.is_pod_like(l.ifindex)
        });
        let first = found.next()?;
        if found.next().is_some() {
            return None;
        }
        Some(first.ifindex)
    }

    /// Every address of this namespace: the node's own IPs.
    pub fn node_ips(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self.addrs.iter().map(|a| a.net.ip()).collect();
        out.sort();
        out.dedup();
        out
    }
}

fn max_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn veth(ifindex: u32, nsid: i32, peer: u32, master: Option<u32>) -> Event {
        Event::Link(Link {
            ifindex,
            name: format!("veth{ifindex}"),
            kind: Some("veth".into()),
            master,
            peer: Some(Peer {
                nsid,
                ifindex: peer,
            }),
        })
    }

    fn bridge(ifindex: u32) -> Event {
        Event::Link(Link {
            ifindex,
            name: "cnbr0".into(),
            kind: Some("bridge".into()),
            master: None,
            peer: None,
        })
    }

    #[test]
    fn bridged_pod_is_the_veth_whose_peer_holds_the_ip() {
        let mut n = HostNet::default();
        n.apply(bridge(2));
        assert_eq!(
            n.apply(veth(5, 0, 2, Some(2))),
            Some(Peer {
                nsid: 0,
                ifindex: 2
            })
        );
        assert_eq!(n.apply(veth(6, 1, 2, Some(2))).map(|p| p.nsid), Some(1));
        assert!(n.is_pod_like(5) && !n.is_pod_like(2));
        assert_eq!(n.resolve(ip("198.18.1.3")), None);
        let p1 = Peer {
            nsid: 1,
            ifindex: 2,
        };
        n.apply(Event::PeerAddr {
            peer: p1,
            ip: ip("198.18.1.3"),
        });
        assert_eq!(n.resolve(ip("198.18.1.3")), Some(6));
        // Events of namespaces behind none of our links are ignored.
        n.apply(Event::PeerAddr {
            peer: Peer {
                nsid: 9,
                ifindex: 2,
            },
            ip: ip("198.18.1.9"),
        });
        assert_eq!(n.resolve(ip("198.18.1.9")), None);
        // Same IP behind two veths: ambiguous, neither.
        n.set_peer_addrs(
            Peer {
                nsid: 0,
                ifindex: 2,
            },
            [ip("198.18.1.3")],
        );
        assert_eq!(n.resolve(ip("198.18.1.3")), None);
        n.apply(Event::LinkGone(5));
        assert_eq!(n.resolve(ip("198.18.1.3")), Some(6));
        n.apply(Event::LinkGone(6));
        assert_eq!(n.resolve(ip("198.18.1.3")), None);
        assert_eq!(n.peers().count(), 0, "peers of gone links are forgotten");
    }

    #[test]
    fn routed_pod_is_the_route_device() {
        let mut n = HostNet::default();
        n.apply(veth(7, 3, 2, None));
        // ptp puts the gateway on the host veth as a host address: still a pod interface.
        n.apply(Event::Addr(HostAddr {
            ifindex: 7,
            net: "198.18.2.1/32".parse().unwrap(),
            global: true,
        }));
        n.apply(Event::Route {
            ip: ip("198.18.2.5"),
            oif: 7,
        });
        assert_eq!(n.resolve(ip("198.18.2.5")), Some(7));
        assert!(n.claims(7).contains(&ip("198.18.2.5")));
        n.apply(Event::RouteGone {
            ip: ip("198.18.2.5"),
            oif: 7,
        });
        assert_eq!(n.resolve(ip("198.18.2.5")), None);
        assert_eq!(n.node_ips(), vec![ip("198.18.2.1")]);
    }

    #[test]
    fn underlay_veth_with_a_subnet_is_not_a_pod() {
        let mut n = HostNet::default();
        n.apply(veth(9, 4, 3, None));
        assert!(n.is_pod_like(9));
        let a = HostAddr {
            ifindex: 9,
            net: "198.19.255.1/30".parse().unwrap(),
            global: true,
        };
        n.apply(Event::Addr(a));
        assert!(!n.is_pod_like(9));
        n.apply(Event::AddrGone(a));
        assert!(n.is_pod_like(9));
        // Link-local addresses (every veth has one) do not count.
        n.apply(Event::Addr(HostAddr {
            ifindex: 9,
            net: "fe80::1/64".parse().unwrap(),
            global: false,
        }));
        assert!(n.is_pod_like(9));
    }

    #[test]
    fn recreated_interface_is_a_new_ifindex() {
        let mut n = HostNet::default();
        n.apply(veth(10, 5, 2, None));
        n.apply(Event::Route {
            ip: ip("198.18.3.2"),
            oif: 10,
        });
        assert_eq!(n.resolve(ip("198.18.3.2")), Some(10));
        n.apply(Event::LinkGone(10));
        assert_eq!(
            n.resolve(ip("198.18.3.2")),
            None,
            "routes die with the link"
        );
        n.apply(veth(11, 5, 2, None));
        n.apply(Event::PeerAddr {
            peer: Peer {
                nsid: 5,
                ifindex: 2,
            },
            ip: ip("198.18.3.2"),
        });
        assert_eq!(n.resolve(ip("198.18.3.2")), Some(11));
    }
}
