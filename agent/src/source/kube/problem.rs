//! Watcher errors as sentences an operator can act on.
//!
//! The watcher retries every error itself (after a backoff); what the agent adds is saying
//! what failed in terms of the RBAC rule that would fix it: a 403 names the verb, resource
//! and API group the agent's ClusterRole lacks.

use kube::core::Status;
use kube::runtime::watcher;

/// What one kind's API access is: for messages and the RBAC check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// API group; `""` is the core group.
    pub group: &'static str,
    /// Plural resource name, as RBAC rules spell it.
    pub resource: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub message: String,
    /// The watch or list expired (410 Gone): the watcher relists, which is routine, not a
    /// problem to report.
    pub expired: bool,
}

pub fn describe(access: Access, err: &watcher::Error) -> Problem {
    use watcher::Error as E;
    let (verb, status) = match err {
        E::InitialListFailed(e) => ("list", api_status(e)),
        E::WatchStartFailed(e) | E::WatchFailed(e) => ("watch", api_status(e)),
        E::WatchError(status) => ("watch", Some(&**status)),
        E::NoResourceVersion => ("list", None),
    };
    let Access { group, resource } = access;
    let message = match status {
        Some(s) if s.is_forbidden() => format!(
            "forbidden: the agent may not {verb} {resource} cluster-wide; its ClusterRole \
             needs apiGroups: [\"{group}\"], resources: [\"{resource}\"], verbs: [\"{verb}\"] \
             (API server: {})",
            s.message
        ),
        _ => format!("cannot {verb} {resource} (apiGroups: [\"{group}\"]): {err}"),
    };
    Problem {
        message,
        expired: status.is_some_and(|s| s.code == 410),
    }
}

fn api_status(err: &kube::Error) -> Option<&Status> {
    match err {
        kube::Error::Api(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: Access = Access {
        group: "",
        resource: "pods",
    };

    fn status(code: u16, reason: &str, message: &str) -> Box<Status> {
        Box::new(
            serde_json::from_value(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code
            }))
            .unwrap(),
        )
    }

    #[test]
    fn forbidden_names_verb_resource_and_group() {
        let err = watcher::Error::InitialListFailed(kube::Error::Api(status(
            403,
            "Forbidden",
            "pods is forbidden: User \"system:serviceaccount:palisade-system:palisade\" cannot list resource \"pods\" in API group \"\" at the cluster scope",
        )));
        let p = describe(PODS, &err);
        assert!(!p.expired);
        assert!(
            p.message.starts_with(
                "forbidden: the agent may not list pods cluster-wide; its ClusterRole needs \
                 apiGroups: [\"\"], resources: [\"pods\"], verbs: [\"list\"]"
            ),
            "{}",
            p.message
        );
        let err = watcher::Error::WatchError(status(403, "Forbidden", "no"));
        let p = describe(
            Access {
                group: "networking.k8s.io",
                resource: "networkpolicies",
            },
            &err,
        );
        assert!(
            p.message.contains("apiGroups: [\"networking.k8s.io\"], resources: [\"networkpolicies\"], verbs: [\"watch\"]"),
            "{}",
            p.message
        );
    }

    #[test]
    fn gone_is_routine_and_other_errors_say_what_failed() {
        let gone = watcher::Error::WatchError(status(410, "Expired", "too old resource version"));
        assert!(describe(PODS, &gone).expired);
        let down = watcher::Error::WatchStartFailed(kube::Error::Api(status(
            500,
            "InternalError",
            "etcdserver: leader changed",
        )));
        let p = describe(PODS, &down);
        assert!(!p.expired);
        assert!(p.message.starts_with("cannot watch pods"), "{}", p.message);
        assert!(
            p.message.contains("etcdserver: leader changed"),
            "{}",
            p.message
        );
    }
}
