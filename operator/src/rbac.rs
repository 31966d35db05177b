//! The API access the operator needs, in one place: a deployment's ClusterRole (the Helm
//! chart's) must grant exactly these rules.

/// One RBAC policy rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// API groups (`""` is the core group).
    pub api_groups: &'static [&'static str],
    /// Resources (and subresources).
    pub resources: &'static [&'static str],
    /// Verbs.
    pub verbs: &'static [&'static str],
}

/// Every rule the operator needs.
pub const RULES: &[Rule] = &[
    // Watch jobs; delete those whose ttlSecondsAfterFinished ran out.
    Rule {
        api_groups: &["kiln.dev"],
        resources: &["computejobs"],
        verbs: &["get", "list", "watch", "delete"],
    },
    Rule {
        api_groups: &["kiln.dev"],
        resources: &["computejobs/status"],
        verbs: &["get", "patch", "update"],
    },
    // The children: watched (owned), server-side applied, pods deleted on loss or suspend.
    Rule {
        api_groups: &[""],
        resources: &["pods", "services", "configmaps"],
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    // The job's token Secret: made, then read by name; never listed or watched, so the
    // operator cannot read Secrets it did not make without knowing their names.
    Rule {
        api_groups: &[""],
        resources: &["secrets"],
        verbs: &["get", "create", "patch", "delete"],
    },
    // The job's NetworkPolicy: server-side applied, garbage-collected with the job.
    Rule {
        api_groups: &["networking.k8s.io"],
        resources: &["networkpolicies"],
        verbs: &["get", "create", "patch"],
    },
    // Whether a pod's node is lost; nodes' disruption taints and allocatable resources.
    Rule {
        api_groups: &[""],
        resources: &["nodes"],
        verbs: &["get", "list", "watch"],
    },
    Rule {
        api_groups: &["events.k8s.io"],
        resources: &["events"],
        verbs: &["create", "patch"],
    },
    // Leader election.
    Rule {
        api_groups: &["coordination.k8s.io"],
        resources: &["leases"],
        verbs: &["get", "create", "update"],
    },
];

/// The rules as the `rules:` of a ClusterRole, in YAML.
pub fn cluster_role_rules_yaml() -> String {
    let quote = |items: &[&str]| {
        items
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    RULES
        .iter()
        .map(|r| {
            format!(
                "- apiGroups: [{}]\n  resources: [{}]\n  verbs: [{}]\n",
                quote(r.api_groups),
                quote(r.resources),
                quote(r.verbs)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_render_as_a_cluster_role() {
        let yaml = cluster_role_rules_yaml();
        assert!(
            yaml.contains("- apiGroups: [\"kiln.dev\"]\n  resources: [\"computejobs/status\"]")
        );
        assert_eq!(yaml.matches("- apiGroups").count(), RULES.len());
    }
}
