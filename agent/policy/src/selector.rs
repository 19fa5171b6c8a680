//! Label selectors (`matchLabels` + `matchExpressions`), parsed once and matched many times.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::error::FieldError;

pub(crate) type Labels = BTreeMap<String, String>;

/// The label the API server puts on every namespace; selectors may rely on it even when the
/// namespace object has not been seen yet.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Requirement {
    Equals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed selector; all requirements are ANDed, none = matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    pub(crate) fn everything() -> Self {
        Self::default()
    }

    /// Parses `sel`; `path` is the JSON path of the selector, used in errors.
    pub(crate) fn parse(sel: &LabelSelector, path: &str) -> Result<Self, Vec<FieldError>> {
        let mut requirements = Vec::new();
        let mut errors = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            requirements.push(Requirement::Equals(k.clone(), v.clone()));
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let here = format!("{path}.matchExpressions[{i}]");
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
            let req = match e.operator.as_str() {
                "In" | "NotIn" if !has_values => {
                    errors.push(FieldError::new(
                        format!("{here}.values"),
                        format!("operator {} needs at least one value", e.operator),
                    ));
                    continue;
                }
                "Exists" | "DoesNotExist" if has_values => {
                    errors.push(FieldError::new(
                        format!("{here}.values"),
                        format!("operator {} takes no values", e.operator),
                    ));
                    continue;
                }
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                other => {
                    errors.push(FieldError::new(
                        format!("{here}.operator"),
                        format!(
                            "unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                        ),
                    ));
                    continue;
                }
            };
            requirements.push(req);
        }
        if errors.is_empty() {
            requirements.sort();
            requirements.dedup();
            Ok(Self { requirements })
        } else {
            Err(errors)
        }
    }

    pub(crate) fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}
