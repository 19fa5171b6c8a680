//! Prefix arithmetic on `ipnetwork` types, always on normalized networks (host bits zero)
//! so that equal prefixes compare equal and a BTreeMap range over [network, broadcast]
//! finds exactly the prefixes inside one.

use std::net::IpAddr;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

pub(crate) fn host(ip: IpAddr) -> IpNetwork {
    match ip {
        IpAddr::V4(a) => IpNetwork::V4(Ipv4Network::new(a, 32).expect("32 is a valid prefix")),
        IpAddr::V6(a) => IpNetwork::V6(Ipv6Network::new(a, 128).expect("128 is a valid prefix")),
    }
}

/// `net` with its host bits cleared.
pub(crate) fn normalize(net: IpNetwork) -> IpNetwork {
    truncate(net.ip(), net.prefix())
}

/// The prefix of length `len` containing `ip`; `len` must fit the family.
pub fn truncate(ip: IpAddr, len: u8) -> IpNetwork {
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let masked = if len == 0 {
                0
            } else {
                bits & (u32::MAX << (32 - u32::from(len)))
            };
            IpNetwork::V4(Ipv4Network::new(masked.into(), len).expect("len fits IPv4"))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let masked = if len == 0 {
                0
            } else {
                bits & (u128::MAX << (128 - u32::from(len)))
            };
            IpNetwork::V6(Ipv6Network::new(masked.into(), len).expect("len fits IPv6"))
        }
    }
}

/// `inner ⊆ outer` (same family, at least as long, inside).
pub(crate) fn within(inner: IpNetwork, outer: IpNetwork) -> bool {
    inner.is_ipv4() == outer.is_ipv4()
        && inner.prefix() >= outer.prefix()
        && truncate(inner.ip(), outer.prefix()) == normalize(outer)
}

pub(crate) fn max_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// The last address of `net`, for range scans.
pub(crate) fn last(net: IpNetwork) -> IpNetwork {
    match normalize(net) {
        IpNetwork::V4(n) => host(IpAddr::V4(n.broadcast())),
        IpNetwork::V6(n) => {
            // A /128 has no host bits (a shift by 128 overflows: a panic in debug builds,
            // the whole space above the address in release ones).
            let host_mask = u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0);
            host(IpAddr::V6((u128::from(n.ip()) | host_mask).into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn last_address_of_every_prefix_length() {
        assert_eq!(last(net("fd00::5/128")), net("fd00::5/128"));
        assert_eq!(last(net("fd00::/127")), net("fd00::1/128"));
        assert_eq!(last(net("fd00::/64")), net("fd00::ffff:ffff:ffff:ffff/128"));
        assert_eq!(
            last(net("::/0")),
            net("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128")
        );
        assert_eq!(last(net("198.18.0.7/32")), net("198.18.0.7/32"));
        assert_eq!(last(net("198.18.0.0/15")), net("198.19.255.255/32"));
        assert_eq!(last(net("0.0.0.0/0")), net("255.255.255.255/32"));
    }
}
