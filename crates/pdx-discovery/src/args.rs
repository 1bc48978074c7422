//! The discovery flags of `pdx serve` (flattened into its arguments) and what they parse to.

use crate::etcd::EtcdTarget;
use crate::k8s::{PodSelector, DEFAULT_PORT_NAME};
use crate::DiscoveryError;
use pdx_protocol::Role;

/// Longest label selector, bytes.
pub const MAX_SELECTOR_BYTES: usize = 1024;
/// Most selectors (role and pool selectors together).
pub const MAX_SELECTORS: usize = 64;

/// Where `pdx serve` finds workers besides its flags, its file and its registration API.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DiscoveryArgs {
    /// Worker discovery: `etcd://host[:port][,host[:port]…][/prefix]` (workers' registration bodies under
    /// `<prefix>/<model>/<id>`, default prefix /pdx/workers; registrations taken by this router are written
    /// through, so every router sees them; credentials from PDX_ETCD_USERNAME / PDX_ETCD_PASSWORD), or `k8s`
    /// (ready pods chosen by --prefill-selector, --decode-selector, --aggregated-selector, --pool-selector)
    /// [default: none]
    #[arg(long, value_name = "etcd://…|k8s")]
    pub discovery: Option<String>,
    /// `--discovery k8s`: namespace of the worker pods [default: the kubeconfig's, or the pod's own]
    #[arg(long)]
    pub namespace: Option<String>,
    /// `--discovery k8s`: label selector of prefill pods (pool `prefill`)
    #[arg(long, value_name = "SELECTOR")]
    pub prefill_selector: Option<String>,
    /// `--discovery k8s`: label selector of decode pods (pool `decode`)
    #[arg(long, value_name = "SELECTOR")]
    pub decode_selector: Option<String>,
    /// `--discovery k8s`: label selector of aggregated pods (pool `aggregated`)
    #[arg(long, value_name = "SELECTOR")]
    pub aggregated_selector: Option<String>,
    /// `--discovery k8s`: pods of a named pool, for the grid (`prefill_pool_0=prefill:app=pdx,tier=short`;
    /// repeatable)
    #[arg(long, value_name = "POOL=ROLE:SELECTOR")]
    pub pool_selector: Vec<String>,
    /// `--discovery k8s`: name of the container port that serves HTTP (the annotation pdx.io/port wins)
    /// [default: http]
    #[arg(long, value_name = "NAME")]
    pub k8s_port_name: Option<String>,
}

/// Kubernetes discovery settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sSpec {
    /// Namespace (`None`: the client configuration's default).
    pub namespace: Option<String>,
    /// Selectors watched.
    pub selectors: Vec<PodSelector>,
    /// Container port name.
    pub port_name: String,
    /// Model of pods without the `pdx.io/model` annotation (`*`: any model name).
    pub default_model: String,
}

/// A parsed `--discovery`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoverySpec {
    /// etcd.
    Etcd(EtcdTarget),
    /// Kubernetes.
    K8s(K8sSpec),
}

fn check_selector(flag: &str, s: &str) -> Result<String, DiscoveryError> {
    let s = s.trim();
    if s.is_empty() || s.len() > MAX_SELECTOR_BYTES || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(DiscoveryError::BadArgs(format!(
            "{flag} must be a label selector of 1 to {MAX_SELECTOR_BYTES} printable ASCII characters \
             without spaces: {}",
            s.escape_debug()
        )));
    }
    Ok(s.to_string())
}

/// A DNS-1123 label (namespaces, port names): lowercase letters, digits and `-`, 1-63 bytes, starting and
/// ending with a letter or digit.
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl DiscoveryArgs {
    /// The discovery these flags ask for (`None`: none).
    ///
    /// Errors: [`DiscoveryError::BadArgs`] for an unknown `--discovery`, a bad etcd URL, Kubernetes flags
    /// without `--discovery k8s` (or `k8s` without a selector), a bad namespace, selector or port name.
    pub fn spec(&self) -> Result<Option<DiscoverySpec>, DiscoveryError> {
        let k8s_flags = self.namespace.is_some()
            || self.prefill_selector.is_some()
            || self.decode_selector.is_some()
            || self.aggregated_selector.is_some()
            || !self.pool_selector.is_empty()
            || self.k8s_port_name.is_some();
        let Some(d) = self.discovery.as_deref() else {
            if k8s_flags {
                return Err(DiscoveryError::BadArgs(
                    "--namespace, --*-selector and --k8s-port-name need --discovery k8s".into(),
                ));
            }
            return Ok(None);
        };
        if d.starts_with("etcd://") {
            if k8s_flags {
                return Err(DiscoveryError::BadArgs(
                    "--namespace, --*-selector and --k8s-port-name belong to --discovery k8s, not etcd"
                        .into(),
                ));
            }
            return Ok(Some(DiscoverySpec::Etcd(EtcdTarget::parse(d)?)));
        }
        if d != "k8s" && d != "kubernetes" {
            return Err(DiscoveryError::BadArgs(format!(
                "--discovery must be etcd://host:port[/prefix] or k8s, not `{}`",
                d.escape_debug()
            )));
        }
        let mut selectors = Vec::new();
        for (flag, role, s) in [
            ("--prefill-selector", Role::Prefill, &self.prefill_selector),
            ("--decode-selector", Role::Decode, &self.decode_selector),
            (
                "--aggregated-selector",
                Role::Aggregated,
                &self.aggregated_selector,
            ),
        ] {
            if let Some(s) = s {
                selectors.push(PodSelector {
                    role,
                    selector: check_selector(flag, s)?,
                    pool: None,
                });
            }
        }
        for p in &self.pool_selector {
            let bad = || {
                DiscoveryError::BadArgs(format!(
                    "--pool-selector must be POOL=ROLE:SELECTOR (prefill_pool_0=prefill:app=pdx), not `{}`",
                    p.escape_debug()
                ))
            };
            let (pool, rest) = p.split_once('=').ok_or_else(bad)?;
            let (role, sel) = rest.split_once(':').ok_or_else(bad)?;
            let role: Role = role.parse().map_err(|_| bad())?;
            if pool.is_empty()
                || pool.len() > pdx_protocol::worker::MAX_NAME_BYTES
                || !pool.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(bad());
            }
            selectors.push(PodSelector {
                role,
                selector: check_selector("--pool-selector", sel)?,
                pool: Some(pool.to_string()),
            });
        }
        if selectors.is_empty() {
            return Err(DiscoveryError::BadArgs(
                "--discovery k8s needs at least one of --prefill-selector, --decode-selector, \
                 --aggregated-selector, --pool-selector"
                    .into(),
            ));
        }
        if selectors.len() > MAX_SELECTORS {
            return Err(DiscoveryError::BadArgs(format!(
                "at most {MAX_SELECTORS} selectors"
            )));
        }
        if let Some(ns) = &self.namespace {
            if !dns_label(ns) {
                return Err(DiscoveryError::BadArgs(format!(
                    "--namespace must be a DNS label (lowercase letters, digits, -; at most 63): {}",
                    ns.escape_debug()
                )));
            }
        }
        let port_name = self
            .k8s_port_name
            .clone()
            .unwrap_or_else(|| DEFAULT_PORT_NAME.into());
        if !dns_label(&port_name) || port_name.len() > 15 {
            return Err(DiscoveryError::BadArgs(format!(
                "--k8s-port-name must be a port name (lowercase letters, digits, -; at most 15): {}",
                port_name.escape_debug()
            )));
        }
        Ok(Some(DiscoverySpec::K8s(K8sSpec {
            namespace: self.namespace.clone(),
            selectors,
            port_name,
            default_model: "*".into(),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        d: DiscoveryArgs,
    }

    fn spec(flags: &[&str]) -> Result<Option<DiscoverySpec>, DiscoveryError> {
        Cli::try_parse_from(std::iter::once("x").chain(flags.iter().copied()))
            .unwrap()
            .d
            .spec()
    }

    #[test]
    fn flags_parse_into_a_spec() {
        assert_eq!(spec(&[]).unwrap(), None);
        let Some(DiscoverySpec::Etcd(t)) =
            spec(&["--discovery", "etcd://127.0.0.1:2379/x"]).unwrap()
        else {
            panic!("etcd")
        };
        assert_eq!(t.prefix, "/x");
        let Some(DiscoverySpec::K8s(k)) = spec(&[
            "--discovery",
            "k8s",
            "--namespace",
            "llm",
            "--prefill-selector",
            "app=pdx,role=prefill",
            "--decode-selector",
            "app=pdx,role=decode",
            "--pool-selector",
            "p1=prefill:app=pdx,tier=long",
        ])
        .unwrap() else {
            panic!("k8s")
        };
        assert_eq!(k.namespace.as_deref(), Some("llm"));
        assert_eq!(k.port_name, "http");
        assert_eq!(k.selectors.len(), 3);
        assert_eq!(k.selectors[2].pool.as_deref(), Some("p1"));
        assert_eq!(k.selectors[2].selector, "app=pdx,tier=long");
        assert_eq!(k.selectors[2].role, Role::Prefill);
    }

    #[test]
    fn bad_flags_are_refused() {
        for bad in [
            &["--discovery", "consul://x"][..],
            &["--discovery", "k8s"],
            &["--prefill-selector", "app=x"],
            &["--discovery", "etcd://h:1", "--decode-selector", "a=b"],
            &["--discovery", "k8s", "--decode-selector", "a = b"],
            &[
                "--discovery",
                "k8s",
                "--decode-selector",
                "a=b",
                "--namespace",
                "Bad_NS",
            ],
            &[
                "--discovery",
                "k8s",
                "--decode-selector",
                "a=b",
                "--k8s-port-name",
                "HTTP",
            ],
            &["--discovery", "k8s", "--pool-selector", "p=boss:a=b"],
            &["--discovery", "k8s", "--pool-selector", "nopool"],
            &["--discovery", "etcd://"],
        ] {
            assert!(
                matches!(spec(bad), Err(DiscoveryError::BadArgs(_))),
                "{bad:?}"
            );
        }
    }
}
