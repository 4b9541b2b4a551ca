//! Which model registries the operator may use for which namespace.
//!
//! The operator writes registries with its own object-store credentials, so without limits any
//! tenant could point a ContinualTraining or a PromotionPolicy at another team's registry and
//! register into it or move its production alias. The cluster admin lists, per namespace, the
//! registry URI prefixes its resources may use (chart values `registries`; flag
//! `--allowed-registries NAMESPACE=PREFIX,...`, `*` for every namespace). Nothing is allowed by
//! default. Inside an allowed registry, the registry's own records decide the rest: a model
//! belongs to the namespace that first claimed it and has one governing PromotionPolicy
//! ([`radfm_registry::Registry::claim`], [`radfm_registry::Registry::govern`]).

use radfm_registry::Registry;

/// The admin's list of `NAMESPACE=PREFIX` allowances.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct RegistryAccess {
    /// Registries each namespace may use: `NAMESPACE=URI-PREFIX` pairs, comma-separated
    /// (`radiology=s3://models/radiology/`, `*=file:///registry` for every namespace). None by
    /// default.
    #[arg(
        long = "allowed-registries",
        env = "RADFM_ALLOWED_REGISTRIES",
        value_delimiter = ','
    )]
    pub allowed: Vec<String>,
}

impl RegistryAccess {
    /// Whether resources of `namespace` may use the registry at `uri`, and if not, why.
    pub fn check(&self, namespace: &str, uri: &str) -> Result<(), String> {
        self.check_store("registry", namespace, uri)
    }

    /// Whether resources of `namespace` may use the store folder at `uri` (`what`: a registry,
    /// a federation's exchange), and if not, why: the same allowances cover both.
    pub fn check_store(&self, what: &str, namespace: &str, uri: &str) -> Result<(), String> {
        let traversal = uri.split('/').any(|part| part == "..");
        let allowed = !traversal
            && self.allowed.iter().any(|entry| {
                entry.split_once('=').is_some_and(|(ns, prefix)| {
                    (ns == "*" || ns == namespace) && under(uri, prefix)
                })
            });
        if allowed {
            return Ok(());
        }
        Err(format!(
            "{what} {uri} is not allowed for namespace {namespace} by the cluster's radfm \
             registry allowances (chart values registries, --allowed-registries)"
        ))
    }

    /// Opens the registry at `uri` for `namespace`, if allowed.
    pub fn open(&self, namespace: &str, uri: &str) -> Result<Registry, String> {
        self.check(namespace, uri)?;
        Registry::open(uri).map_err(|e| format!("registry: {e}"))
    }
}

/// `uri` is `prefix` or inside it (on a path boundary: `s3://b/team` does not cover
/// `s3://b/team-b`).
fn under(uri: &str, prefix: &str) -> bool {
    if prefix.is_empty() {
        return false;
    }
    let uri = uri.trim_end_matches('/');
    let prefix = prefix.trim_end_matches('/');
    uri == prefix
        || uri
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_uses_only_the_registries_the_admin_listed_for_it() {
        let access = RegistryAccess {
            allowed: vec![
                "radiology=s3://models/radiology/".into(),
                "*=s3://shared".into(),
            ],
        };
        let table = [
            ("radiology", "s3://models/radiology", true),
            ("radiology", "s3://models/radiology/registry", true),
            ("cardiology", "s3://models/radiology/registry", false),
            ("radiology", "s3://models/radiology-other", false),
            ("radiology", "s3://models/radiology/../cardiology", false),
            ("cardiology", "s3://shared/registry", true),
            ("cardiology", "s3://sharedother", false),
            ("radiology", "gs://models/radiology", false),
        ];
        for (ns, uri, ok) in table {
            assert_eq!(access.check(ns, uri).is_ok(), ok, "{ns} {uri}");
        }
        let e = RegistryAccess::default()
            .check("radiology", "s3://r")
            .unwrap_err();
        assert!(
            e.contains("registry s3://r is not allowed for namespace radiology"),
            "{e}"
        );
    }
}
