//! Kernel-facing test harness: real network namespaces, real CNI plugins and
//! in-process probes, so enforcement tests exercise the same datapath a
//! Kubernetes node would.
//!
//! Every resource is an RAII guard; dropping it (also while unwinding from a
//! failed assertion) removes what it created.
//!
//! ```no_run
//! use std::time::Duration;
//! use palisade_tests::{require_root, Family, Node, ProbeError, Proto, Server, Model};
//! use palisade_tests::probe::tcp_connect;
//!
//! require_root();
//! let node = Node::routed("demo")?;                 // or Node::bridged
//! let (a, b) = (node.add_pod("x/a")?, node.add_pod("x/b")?);
//! let _srv = Server::tcp(b.ns(), 80, "x/b")?;       // replies "x/b"
//! let t = Duration::from_secs(1);
//! assert_eq!(tcp_connect(a.ns(), b.ip(Family::V6), 80, t).as_deref(), Ok("x/b"));
//! assert_eq!(tcp_connect(a.ns(), b.ip(Family::V4), 81, t), Err(ProbeError::Refused));
//! // tc programs go on the host side, in the node netns:
//! let (_ifname, _ifindex) = (a.host_ifname(), a.host_ifindex());
//!
//! let model = Model::new("mx", palisade_tests::Flavour::Bridged)?;
//! let mut want = model.expect(true);
//! want.set_to("x/a", false);                        // e.g. deny-all ingress on x/a
//! palisade_tests::assert_matrix(&want, &model.probe_matrix(80, Proto::Tcp));
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod agent;
pub mod cases;
pub mod cni;
pub mod http;
pub mod inproc;
pub mod kube_proxy;
pub mod manifests;
pub mod matrix;
pub mod netns;
pub mod packets;
pub mod pins;
pub mod privilege;
pub mod probe;
pub mod sniff;
pub mod stream;
pub mod strict;
pub mod traffic;
pub mod util;

pub use cni::{Flavour, Node, Pod, Underlay};
pub use matrix::{assert_matrix, truth_table, Matrix, Model};
pub use netns::NetNs;
pub use privilege::require_root;
pub use probe::{tcp_connect, udp_probe, Family, ProbeError, ProbeLog, Prober, Proto, Server};
pub use util::wait_until;
