//! The pod and reason filters `palisade drops` and `palisade monitor` share.

/// Which pods and reasons to show.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Filters {
    /// Only pods of this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only this pod (name, or namespace/name).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only this reason (e.g. dropped-no-rule).
    #[arg(long)]
    pub reason: Option<String>,
}

impl Filters {
    /// `pod` is `namespace/name` as the agent's status names it.
    pub fn matches(&self, pod: &str, reason: &str) -> bool {
        let (ns, name) = pod.split_once('/').unwrap_or(("", pod));
        self.namespace.as_deref().is_none_or(|n| n == ns)
            && self.pod.as_deref().is_none_or(|p| p == name || p == pod)
            && self.reason.as_deref().is_none_or(|r| r == reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_matches_by_name_or_namespace_slash_name() {
        let f = Filters {
            pod: Some("a".into()),
            ..Default::default()
        };
        assert!(f.matches("x/a", "dropped-no-rule"));
        assert!(!f.matches("x/b", "dropped-no-rule"));
        let f = Filters {
            namespace: Some("x".into()),
            pod: Some("x/a".into()),
            reason: Some("dropped-malformed".into()),
        };
        assert!(f.matches("x/a", "dropped-malformed"));
        assert!(!f.matches("y/a", "dropped-malformed"));
        assert!(!f.matches("x/a", "dropped-no-rule"));
    }
}
