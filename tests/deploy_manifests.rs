//! The deployment files in `deploy/` (issue 16) parse, and agree with each other and with the `pdx` flags:
//! the router's selectors choose the worker pods, its service account may list and watch pods, the
//! Services select the pods they front, every container port a Service names exists, and every `pdx`
//! invocation in them names only flags the binary knows, with values of the right type.
//!
//! No cluster runs here: this is what can be checked without one.

use serde_yaml::Value;
use std::path::{Path, PathBuf};

fn manifests() -> Vec<(PathBuf, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files = Vec::new();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push((f.clone(), v));
            }
        }
    }
    docs
}

use serde::Deserialize;

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path)?.as_str()
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn kind<'a>(docs: &'a [(PathBuf, Value)], k: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(_, d)| s(d, &["kind"]) == Some(k))
        .map(|(_, d)| d)
        .collect()
}

fn containers(d: &Value) -> Vec<&Value> {
    get(d, &["spec", "template", "spec", "containers"])
        .and_then(Value::as_sequence)
        .map(|c| c.iter().collect())
        .unwrap_or_default()
}

fn args(c: &Value) -> Vec<String> {
    get(c, &["args"])
        .and_then(Value::as_sequence)
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn pod_labels(d: &Value) -> Vec<(String, String)> {
    get(d, &["spec", "template", "metadata", "labels"])
        .and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `k=v,k=v` matches the labels.
fn selects(selector: &str, labels: &[(String, String)]) -> bool {
    selector.split(',').all(|kv| {
        let (k, v) = kv.split_once('=').unwrap();
        labels.iter().any(|(lk, lv)| lk == k && lv == v)
    })
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let p = format!("--{name}=");
    args.iter().find_map(|a| a.strip_prefix(&p))
}

#[test]
fn every_document_is_a_named_kubernetes_object() {
    for (f, d) in manifests() {
        assert!(s(&d, &["apiVersion"]).is_some(), "{}", f.display());
        assert!(s(&d, &["kind"]).is_some(), "{}", f.display());
        assert!(s(&d, &["metadata", "name"]).is_some(), "{}", f.display());
    }
}

#[test]
fn the_router_finds_the_workers_and_may_watch_them() {
    let docs = manifests();
    let deployments = kind(&docs, "Deployment");
    let router = deployments
        .iter()
        .find(|d| s(d, &["metadata", "name"]) == Some("pdx-router"))
        .expect("router Deployment");
    assert_eq!(
        get(router, &["spec", "replicas"]).and_then(Value::as_u64),
        Some(2)
    );
    let ra = args(containers(router)[0]);
    assert_eq!(flag(&ra, "discovery"), Some("k8s"));
    // Each role selector picks the pods of exactly one worker Deployment, whose pods name the port `http`.
    for (sel, role) in [
        ("prefill-selector", "prefill"),
        ("decode-selector", "decode"),
    ] {
        let sel = flag(&ra, sel).expect("selector");
        let chosen: Vec<_> = deployments
            .iter()
            .filter(|d| selects(sel, &pod_labels(d)))
            .collect();
        assert_eq!(chosen.len(), 1, "{sel}");
        let w = chosen[0];
        let wa = args(containers(w)[0]);
        assert_eq!(wa[0], "mock");
        assert_eq!(flag(&wa, "role"), Some(role));
        let ports = get(containers(w)[0], &["ports"])
            .and_then(Value::as_sequence)
            .unwrap();
        assert!(ports.iter().any(|p| s(p, &["name"]) == Some("http")));
    }
    // The service account the router runs as may get, list and watch pods.
    let sa = s(router, &["spec", "template", "spec", "serviceAccountName"]).unwrap();
    let binding = kind(&docs, "RoleBinding")
        .into_iter()
        .find(|b| {
            get(b, &["subjects"])
                .and_then(Value::as_sequence)
                .unwrap()
                .iter()
                .any(|x| s(x, &["name"]) == Some(sa))
        })
        .expect("a RoleBinding of the router's service account");
    let role_name = s(binding, &["roleRef", "name"]).unwrap();
    let role = kind(&docs, "Role")
        .into_iter()
        .find(|r| s(r, &["metadata", "name"]) == Some(role_name))
        .expect("the bound Role");
    let rules = get(role, &["rules"]).and_then(Value::as_sequence).unwrap();
    let verbs: Vec<&str> = rules
        .iter()
        .filter(|r| {
            get(r, &["resources"])
                .and_then(Value::as_sequence)
                .unwrap()
                .iter()
                .any(|x| x.as_str() == Some("pods"))
        })
        .flat_map(|r| get(r, &["verbs"]).and_then(Value::as_sequence).unwrap())
        .filter_map(Value::as_str)
        .collect();
    for v in ["list", "watch"] {
        assert!(verbs.contains(&v), "{verbs:?}");
    }
    assert!(!kind(&docs, "ServiceAccount").is_empty());
}

#[test]
fn services_select_their_pods_and_name_existing_ports() {
    let docs = manifests();
    let workloads: Vec<&Value> = kind(&docs, "Deployment")
        .into_iter()
        .chain(kind(&docs, "StatefulSet"))
        .collect();
    for svc in kind(&docs, "Service") {
        let sel = get(svc, &["spec", "selector"])
            .and_then(Value::as_mapping)
            .unwrap();
        let sel: Vec<String> = sel
            .iter()
            .map(|(k, v)| format!("{}={}", k.as_str().unwrap(), v.as_str().unwrap()))
            .collect();
        let sel = sel.join(",");
        let backends: Vec<_> = workloads
            .iter()
            .filter(|d| selects(&sel, &pod_labels(d)))
            .collect();
        assert_eq!(backends.len(), 1, "{sel}");
        for p in get(svc, &["spec", "ports"])
            .and_then(Value::as_sequence)
            .unwrap()
        {
            let target = s(p, &["targetPort"]).unwrap();
            let named = containers(backends[0]).iter().any(|c| {
                get(c, &["ports"])
                    .and_then(Value::as_sequence)
                    .unwrap()
                    .iter()
                    .any(|cp| s(cp, &["name"]) == Some(target))
            });
            assert!(named, "{sel}: no container port {target}");
        }
    }
}

#[test]
fn every_pdx_invocation_parses() {
    // Each `pdx` argument list (with its `$(VAR)` references filled in) followed by `--help`: the parser
    // refuses an unknown flag or a badly typed value met before `--help`, and prints help (exit 0) otherwise,
    // without starting anything.
    let bin = env!("CARGO_BIN_EXE_pdx");
    for (f, d) in manifests() {
        for c in containers(&d) {
            let a = args(c);
            let is_pdx = s(c, &["image"]).is_some_and(|i| i.starts_with("pdx"));
            if !is_pdx || a.is_empty() {
                continue;
            }
            let a: Vec<String> = a
                .iter()
                .map(|x| {
                    x.replace("$(POD_IP)", "10.0.0.1")
                        .replace("$(PDX_ADMIN_TOKEN)", "t")
                })
                .collect();
            let out = std::process::Command::new(bin)
                .args(&a)
                .arg("--help")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{}: pdx {a:?} refused: {err}",
                f.display()
            );
        }
    }
}
