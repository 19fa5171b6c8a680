//! The agent's HTTP endpoints (`/metrics`, `/readyz`, `/healthz`) as a client on the node
//! sees them: one plain HTTP/1.1 GET from inside the node's namespace, and samples picked
//! out of the metrics text.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use crate::netns::NetNs;

/// GET `path` on `addr` (the agent's `--http-addr`, on the node's own loopback) from
/// inside `ns`: (status code, body). Panics if nothing listens there or no answer comes
/// within 5 s.
pub fn http_get(ns: &NetNs, addr: &str, path: &str) -> (u16, String) {
    ns.run(|| {
        let mut s = TcpStream::connect(addr).expect("agent HTTP port");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let code = resp
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    })
}

/// The value of the first sample of exactly `metric` (not of a longer name it prefixes)
/// whose line contains every label in `labels` (`name="value"`).
pub fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_matches_the_exact_metric_and_every_label() {
        let text = "# HELP m_total x\n\
                    m_total_extra{map=\"A\"} 9\n\
                    m_total{map=\"B\"} 2\n\
                    m_total{map=\"A\"} 3\n\
                    m_count 4\n";
        assert_eq!(sample(text, "m_total", &["map=\"A\""]), Some(3.0));
        assert_eq!(sample(text, "m_total", &[]), Some(2.0));
        assert_eq!(sample(text, "m_count", &[]), Some(4.0));
        assert_eq!(sample(text, "m_total", &["map=\"C\""]), None);
        assert_eq!(sample(text, "m", &[]), None);
    }
}
