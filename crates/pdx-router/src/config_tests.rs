//! Tests of [`super`] (the configuration: flags, the TOML file, their checks).

use super::*;
use clap::Parser;

fn args(flags: &[&str]) -> ServeArgs {
    ServeArgs::try_parse_from(std::iter::once("pdx-serve").chain(flags.iter().copied()))
        .expect("flags parse")
}

fn from_toml(flags: &[&str], toml_text: &str) -> Result<Config, RouterError> {
    let file: FileConfig =
        toml::from_str(toml_text).map_err(|e| RouterError::Config(e.to_string()))?;
    Config::resolve(&args(flags), file, None)
}

#[test]
fn worker_urls_are_checked() {
    for (url, auth) in [
        ("http://10.0.0.1:8000", "10.0.0.1:8000"),
        ("http://10.0.0.1:8000/", "10.0.0.1:8000"),
        ("http://worker-1.pool.svc:30000", "worker-1.pool.svc:30000"),
        ("http://h", "h:80"),
        ("http://[::1]:9", "[::1]:9"),
        ("http://[fd00::1]", "[fd00::1]:80"),
    ] {
        assert_eq!(parse_worker_url(url).unwrap().authority, auth, "{url}");
    }
    assert_eq!(parse_worker_url("http://h:1/").unwrap().url, "http://h:1");
    for bad in [
        "https://h:1",
        "h:1",
        "ftp://h:1",
        "http://",
        "http://:80",
        "http://h:0",
        "http://h:65536",
        "http://h:",
        "http://h:+1",
        "http://h:1/v1",
        "http://h:1/v1/chat/completions",
        "http://h:1?x=y",
        "http://h:1/?x=y",
        "http://h:1#f",
        "http://user:pw@h:1",
        "http://@h:1",
        "http://h:1\r\nHost: evil",
        "http://h:1\r\n",
        "http://h :1",
        "http://h\u{0}:1",
        "http://hé:1",
        "http://-h:1",
        "http://h_1:1",
        "http://[::1:1",
        "http://[::1]x:1",
        "http://[zz::1]:1",
    ] {
        assert!(
            matches!(parse_worker_url(bad), Err(RouterError::BadWorkerUrl(_))),
            "accepted {bad:?}"
        );
    }
    // Static workers of the file go through the same check.
    assert!(from_toml(&["--decode", "http://d:1/v1"], "").is_err());
}

#[test]
fn cidr_allow_list() {
    let c: Cidr = "10.0.0.0/8".parse().unwrap();
    assert!(c.contains("10.1.2.3".parse().unwrap()));
    assert!(!c.contains("11.0.0.1".parse().unwrap()));
    assert!(
        c.contains("::ffff:10.0.0.1".parse().unwrap()),
        "IPv4-mapped"
    );
    assert!(!c.contains("fd00::1".parse().unwrap()));
    let one: Cidr = "127.0.0.1".parse().unwrap();
    assert!(one.contains("127.0.0.1".parse().unwrap()));
    assert!(!one.contains("127.0.0.2".parse().unwrap()));
    let all: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains("8.8.8.8".parse().unwrap()));
    let v6: Cidr = "fd00::/8".parse().unwrap();
    assert!(v6.contains("fd12::3".parse().unwrap()));
    assert!(!v6.contains("fe80::1".parse().unwrap()));
    for bad in ["10.0.0.0/33", "fd00::/129", "10.0.0/8", "x", "10.0.0.0/"] {
        assert!(bad.parse::<Cidr>().is_err(), "{bad}");
    }
    let c = from_toml(
        &["--worker-allow-cidr", "10.0.0.0/8"],
        "worker_allow_cidrs = [\"192.168.0.0/16\"]\nauth_token = \"t\"",
    )
    .unwrap();
    assert_eq!(c.worker_allow.len(), 2);
    assert_eq!(c.admin_token.as_deref(), Some("t"));
}

#[test]
fn ksana_registry_from_flags_and_file() {
    let c = from_toml(&["--orchestration", "ksana"], "").unwrap();
    assert_eq!(c.orchestration, OrchestrationKind::Ksana);
    let k = c.ksana.expect("ksana settings");
    assert_eq!(k.db, pdx_ksana::Database::Sqlite("pdx-ksana.db".into()));
    assert_eq!(k.settings.cluster_name, "default_cluster");
    assert_eq!(k.settings.heartbeat_timeout_us, 60_000_000);
    assert!(k.create_schema);
    let file = r#"
        orchestration = "ksana"
        [ksana]
        db = "mysql://u:secret@127.0.0.1:3306/router"
        cluster_name = "c1"
        heartbeat_timeout_secs = 5
        create_schema = false
        max_nodes = 8
    "#;
    let k = from_toml(&[], file).unwrap().ksana.unwrap();
    assert_eq!(
        k.db,
        pdx_ksana::Database::Mysql("mysql://u:secret@127.0.0.1:3306/router".into())
    );
    assert_eq!(
        (
            k.settings.cluster_name.as_str(),
            k.settings.heartbeat_timeout_us
        ),
        ("c1", 5_000_000)
    );
    assert_eq!((k.create_schema, k.settings.max_nodes), (false, 8));
    assert!(!format!("{k:?}").contains("secret"), "no password in logs");
    // Flags win over the file.
    let k = from_toml(
        &[
            "--ksana-db",
            "/tmp/x.db",
            "--ksana-cluster",
            "c2",
            "--ksana-heartbeat-timeout-secs",
            "2.5",
        ],
        file,
    )
    .unwrap()
    .ksana
    .unwrap();
    assert_eq!(k.db, pdx_ksana::Database::Sqlite("/tmp/x.db".into()));
    assert_eq!(
        (
            k.settings.cluster_name.as_str(),
            k.settings.heartbeat_timeout_us
        ),
        ("c2", 2_500_000)
    );
    // Static workers have no place under it; other orchestrations have no registry.
    let e = from_toml(
        &["--orchestration", "ksana", "--decode", "http://127.0.0.1:1"],
        "",
    )
    .unwrap_err();
    assert!(e.to_string().contains("register themselves"), "{e}");
    assert!(from_toml(&["--ksana-db", ":memory:", "--orchestration", "ksana"], "").is_err());
    assert!(from_toml(&[], "").unwrap().ksana.is_none());
    assert!(from_toml(&[], "[ksana]\nbogus = 1").is_err());
}

#[test]
fn orchestration_names_aliases_and_flag() {
    for (name, kind) in [
        ("vllm-nixl", OrchestrationKind::VllmNixl),
        ("sglang-bootstrap", OrchestrationKind::SglangBootstrap),
        ("sglang_bootstrap", OrchestrationKind::SglangBootstrap),
        ("sglang", OrchestrationKind::SglangBootstrap),
        ("bootstrap", OrchestrationKind::SglangBootstrap),
        ("aggregated", OrchestrationKind::Aggregated),
    ] {
        let c = from_toml(&[], &format!("orchestration = \"{name}\"")).unwrap();
        assert_eq!(c.orchestration, kind, "{name}");
    }
    assert_eq!(
        from_toml(&[], "").unwrap().orchestration,
        OrchestrationKind::VllmNixl
    );
    // The flag overrides the file.
    let c = from_toml(
        &["--orchestration", "sglang"],
        "orchestration = \"vllm-nixl\"",
    )
    .unwrap();
    assert_eq!(c.orchestration, OrchestrationKind::SglangBootstrap);
    let e = from_toml(&["--orchestration", "sglang-pd"], "").unwrap_err();
    assert!(
        e.to_string().contains("unknown orchestration `sglang-pd`"),
        "{e}"
    );
    assert!(from_toml(&[], "orchestration = \"mooncake\"").is_err());
}

#[test]
fn bootstrap_ports_in_the_file() {
    let c = from_toml(
        &[],
        r#"
        orchestration = "sglang-bootstrap"
        [[models]]
        name = "m"
        [[models.pools]]
        name = "p0"
        role = "prefill"
        workers = ["http://10.0.0.1:30000", { url = "http://10.0.0.2:30000", bootstrap_port = 9001 }]
        [[models.pools]]
        name = "p1"
        role = "prefill"
        bootstrap_port = 9100
        workers = ["http://10.0.0.3:30000", { url = "http://10.0.0.4:30000" }]
        [[models.pools]]
        name = "d"
        role = "decode"
        workers = ["http://10.0.0.5:30000"]
        "#,
    )
    .unwrap();
    let ports: Vec<Vec<(&str, u16)>> = c.models[0]
        .pools
        .iter()
        .map(|p| {
            p.workers
                .iter()
                .map(|w| (w.url.as_str(), w.bootstrap_port))
                .collect()
        })
        .collect();
    assert_eq!(
        ports,
        vec![
            vec![
                ("http://10.0.0.1:30000", DEFAULT_BOOTSTRAP_PORT),
                ("http://10.0.0.2:30000", 9001)
            ],
            vec![
                ("http://10.0.0.3:30000", 9100),
                ("http://10.0.0.4:30000", 9100)
            ],
            vec![("http://10.0.0.5:30000", DEFAULT_BOOTSTRAP_PORT)],
        ]
    );
    assert_eq!(c.models[0].pools[0].bootstrap_port, 8998);
    assert_eq!(c.models[0].pools[1].bootstrap_port, 9100);
}

#[test]
fn bad_bootstrap_ports_in_the_file_are_errors() {
    let pool = |extra: &str, worker: &str| {
        format!("[[models]]\nname = \"m\"\n[[models.pools]]\nname = \"p\"\nrole = \"prefill\"\n{extra}\nworkers = [{worker}]\n")
    };
    for (extra, worker) in [
        ("bootstrap_port = 0", "\"http://h:1\""),
        ("bootstrap_port = 70000", "\"http://h:1\""),
        ("", "{ url = \"http://h:1\", bootstrap_port = 0 }"),
        ("", "{ url = \"http://h:1\", bootstrap_port = \"x\" }"),
        ("", "{ url = \"http://h:1\", bootstrap = 9000 }"),
        ("", "{ url = \"h:1\", bootstrap_port = 9000 }"),
    ] {
        assert!(
            from_toml(&[], &pool(extra, worker)).is_err(),
            "accepted {extra} {worker}"
        );
    }
}

#[test]
fn kv_events_endpoints_are_tcp_host_port_only() {
    let e = KvEventsEndpoints::parse("tcp://127.0.0.1:5557", Some("tcp://[::1]:5558")).unwrap();
    assert_eq!(e.endpoint, "127.0.0.1:5557");
    assert_eq!(e.replay.as_deref(), Some("[::1]:5558"));
    assert_eq!(e.ips.len(), 2);
    assert!(KvEventsEndpoints::parse("tcp://worker-0.local:5557", None)
        .unwrap()
        .ips
        .is_empty());
    for bad in [
        "tcp://*:5557",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:70000",
        "ipc:///tmp/kv",
        "http://127.0.0.1:5557",
        "tcp://127.0.0.1:5557/x",
        "tcp://user@h:1",
        "tcp://h h:1",
    ] {
        assert!(KvEventsEndpoints::parse(bad, None).is_err(), "{bad}");
    }
    assert!(KvEventsEndpoints::from_fields(None, Some("tcp://h:1")).is_err());
    let c = from_toml(
        &[],
        r#"
[[models]]
name = "m"
[[models.pools]]
name = "a"
role = "aggregated"
policy = "kv_aware"
workers = [{ url = "http://127.0.0.1:1", kv_events_endpoint = "tcp://127.0.0.1:5557", kv_events_replay_endpoint = "tcp://127.0.0.1:5558" }]
"#,
    )
    .unwrap();
    let w = &c.models[0].pools[0].workers[0];
    assert_eq!(
        w.kv_events.as_ref().map(|k| k.endpoint.as_str()),
        Some("127.0.0.1:5557")
    );
}

#[test]
fn prefill_flag_takes_an_optional_bootstrap_port() {
    let c = from_toml(
        &[
            "--prefill",
            "http://p1:30000",
            "9001",
            "--prefill",
            "http://p2:30000",
            "--decode",
            "http://d1:30000",
            "--orchestration",
            "sglang-bootstrap",
        ],
        "",
    )
    .unwrap();
    let p = &c.models[0].pools[0];
    assert_eq!(p.role, pdx_protocol::Role::Prefill);
    assert_eq!(
        p.workers,
        vec![
            WorkerSpec {
                url: "http://p1:30000".into(),
                bootstrap_port: 9001,
                api_key: None,
                kv_events: None,
            },
            WorkerSpec {
                url: "http://p2:30000".into(),
                bootstrap_port: DEFAULT_BOOTSTRAP_PORT,
                api_key: None,
                kv_events: None,
            },
        ]
    );
    assert_eq!(c.models[0].pools[1].workers[0].url, "http://d1:30000");
    for bad in [
        &["--prefill", "http://p1:30000", "0"][..],
        &["--prefill", "http://p1:30000", "x"],
        &["--prefill", "http://p1:30000", "65536"],
        &["--prefill", "9000"],
    ] {
        assert!(from_toml(bad, "").is_err(), "accepted {bad:?}");
    }
    // Two ports for one URL: clap takes at most two values per `--prefill`.
    assert!(ServeArgs::try_parse_from([
        "pdx-serve",
        "--prefill",
        "http://p1:30000",
        "9001",
        "9002"
    ])
    .is_err());
}
