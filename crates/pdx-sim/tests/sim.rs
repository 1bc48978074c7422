//! The simulator's timing against the mock's formula, its conservation of requests, KV capacity
//! waits, and the planner driving the virtual connector.

use pdx_mock::profile::TimingProfile;
use pdx_replay::Slo;
use pdx_sim::workload::SimRequest;
use pdx_sim::{Cluster, RunOptions, Sim};
use std::path::Path;

fn cluster(toml: &str) -> Cluster {
    Cluster::from_toml(toml, Path::new(".")).unwrap()
}

fn req(at_s: f64, isl: u32, osl: u32) -> SimRequest {
    SimRequest {
        arrival_ns: (at_s * 1e9) as u64,
        isl,
        osl,
        hash_ids: vec![],
    }
}

fn opts() -> RunOptions {
    RunOptions {
        slo: Slo {
            ttft_ms: Some(100.0),
            itl_ms: Some(10.0),
        },
        progress: false,
        seed: 1,
        no_divert: false,
    }
}

/// Step time of the default profile with `p` prefill tokens (context after chunk `c`) and `d`
/// decodes at total context `ctx`.
fn step_us(p: f64, c: f64, d: f64, ctx: f64) -> f64 {
    let t = TimingProfile::default();
    t.step_overhead_us
        + t.prefill_token_us * p
        + t.prefill_attn_ns * p * c / 1e3
        + t.decode_seq_us * d
        + t.decode_ctx_ns * ctx / 1e3
}

#[test]
fn aggregated_single_request_times_are_the_mock_formula() {
    let c = cluster("[[pools]]\nname = \"a\"\nrole = \"aggregated\"\nworkers = 1\n");
    let reqs = vec![req(0.0, 1000, 4)];
    let out = Sim::new(&c, &reqs, None, &opts()).unwrap().run();
    let r = &out.report;
    assert_eq!(
        (r.requests, r.succeeded, r.output_tokens_received),
        (1, 1, 4)
    );
    let ttft = step_us(1000.0, 1000.0, 0.0, 0.0);
    assert!(
        (r.ttft_ms.mean - ttft / 1e3).abs() < 0.01,
        "{}",
        r.ttft_ms.mean
    );
    // Decode steps at contexts 1001, 1002, 1003 (prompt + generated so far).
    let gaps: Vec<f64> = (1..4)
        .map(|g| step_us(0.0, 0.0, 1.0, 1000.0 + g as f64))
        .collect();
    let e2e = ttft + gaps.iter().sum::<f64>();
    assert!(
        (r.e2e_ms.mean - e2e / 1e3).abs() < 0.01,
        "{}",
        r.e2e_ms.mean
    );
    assert!((r.itl_ms.p50 - gaps[1] / 1e3).abs() < 0.01);
    assert_eq!(out.pools[0].requests, 1);
}

#[test]
fn disaggregated_ttft_is_prefill_plus_handoff_plus_first_decode_step() {
    let c = cluster(
        "[kv_handoff]\nbandwidth_gbps = 1.0\nlatency_us = 1000.0\nkv_scale_down = 16\n\
         [[pools]]\nname = \"p\"\nrole = \"prefill\"\nworkers = 1\n\
         [[pools]]\nname = \"d\"\nrole = \"decode\"\nworkers = 1\n",
    );
    let reqs = vec![req(0.0, 1600, 2)];
    let out = Sim::new(&c, &reqs, None, &opts()).unwrap().run();
    let prefill = step_us(1600.0, 1600.0, 0.0, 0.0);
    // 100 blocks × 16 tokens × 28 layers × (8·128·2·2 / 16 = 256 B) = 11,468,800 B at 1 GB/s.
    let handoff = 1000.0 + 11_468_800.0 / 1e3;
    // The decode engine computes the prompt's last token (1 token at context 1600).
    let first = step_us(1.0, 1600.0, 0.0, 0.0);
    let want = (prefill + handoff + first) / 1e3;
    assert!(
        (out.report.ttft_ms.mean - want).abs() < 0.01,
        "{} vs {want}",
        out.report.ttft_ms.mean
    );
    assert_eq!(out.pools[0].requests, 1);
    assert_eq!(out.pools[1].requests, 1);
    // About 21 ms TTFT and 2 ms ITL: within the 100 ms / 10 ms SLO.
    assert_eq!(out.report.slo_attainment, Some(1.0));
}

#[test]
fn every_request_ends_once_and_prefix_hits_save_prefill() {
    let c = cluster(
        "[[pools]]\nname = \"p\"\nrole = \"prefill\"\nworkers = 2\npolicy = \"kv_aware\"\n\
         [[pools]]\nname = \"d\"\nrole = \"decode\"\nworkers = 3\npolicy = \"least_loaded\"\n",
    );
    // 200 requests sharing a 2048-token prefix (4 Mooncake blocks), 20 ms apart.
    let reqs: Vec<SimRequest> = (0..200)
        .map(|i| SimRequest {
            hash_ids: vec![1, 2, 3, 4, 100 + i],
            ..req(i as f64 * 0.02, 2200, 20)
        })
        .collect();
    let out = Sim::new(&c, &reqs, None, &opts()).unwrap().run();
    let r = &out.report;
    assert_eq!((r.requests, r.succeeded), (200, 200));
    assert_eq!(r.output_tokens_received, 200 * 20);
    assert_eq!(r.length_mismatches, 0);
    // With the prefix cached the prefill computes ~152 tokens, not 2200.
    let full = step_us(2200.0, 2200.0, 0.0, 0.0) / 1e3;
    assert!(r.ttft_ms.p50 < full, "{} vs {full}", r.ttft_ms.p50);
    let unique: Vec<SimRequest> = reqs
        .iter()
        .map(|q| SimRequest {
            hash_ids: vec![],
            ..q.clone()
        })
        .collect();
    let cold = Sim::new(&c, &unique, None, &opts()).unwrap().run();
    assert!(cold.report.ttft_ms.p50 > r.ttft_ms.p50 + 1.0);
}

#[test]
fn kv_capacity_makes_requests_wait_and_oversized_ones_fail() {
    // 64 blocks of 16 tokens: one 600-token request at a time; 2000 tokens never fit.
    let c =
        cluster("[[pools]]\nname = \"a\"\nrole = \"aggregated\"\nworkers = 1\nnum_blocks = 64\n");
    let reqs = vec![req(0.0, 600, 50), req(0.0, 600, 50), req(0.0, 2000, 5)];
    let out = Sim::new(&c, &reqs, None, &opts()).unwrap().run();
    let r = &out.report;
    assert_eq!(r.succeeded, 2);
    assert_eq!(r.errors.get("http_400"), Some(&1));
    // The second waited for the first to finish: its TTFT is the first's whole run.
    assert!(r.ttft_ms.p99 > 50.0 * 2.0, "{:?}", r.ttft_ms);
}

#[test]
fn planner_scales_a_step_up_then_down_without_losing_requests() {
    let c = cluster(
        "[[pools]]\nname = \"p\"\nrole = \"prefill\"\nworkers = 1\nstartup_secs = 5\npolicy = \"least_loaded\"\n\
         [[pools]]\nname = \"d\"\nrole = \"decode\"\nworkers = 1\nstartup_secs = 5\npolicy = \"least_loaded\"\n\
         [planner]\ninterval_secs = 10\nbudget_gpus = 64\npredictor = { kind = \"constant\" }\n\
         [[planner.pools]]\nname = \"p\"\nrole = \"prefill\"\nttft_ms = 300\n\
         [[planner.pools]]\nname = \"d\"\nrole = \"decode\"\nitl_ms = 30\n",
    );
    // 5 req/s for 60 s, 60 req/s for 60 s, 5 req/s for 120 s; 4000-token prompts.
    let mut reqs = Vec::new();
    let mut t = 0.0;
    while t < 240.0 {
        reqs.push(req(t, 4000, 100));
        t += if (60.0..120.0).contains(&t) {
            1.0 / 60.0
        } else {
            0.2
        };
    }
    let planner = pdx_sim::planner(&c, None).unwrap();
    let out = Sim::new(&c, &reqs, planner, &opts()).unwrap().run();
    let r = &out.report;
    assert_eq!(r.succeeded, r.requests, "{:?}", r.errors);
    let p = &out.pools[0];
    assert!(p.max_workers >= 3, "prefill scaled up: {p:?}");
    // After the step, back down.
    let last = out.timeline.last().unwrap();
    assert!(last.replicas[0] < p.max_workers, "{:?}", out.timeline);
    assert!(!out.decisions.is_empty());
    // Fewer GPU-hours than keeping the peak for the whole run.
    let peak_hours = f64::from(p.max_workers + out.pools[1].max_workers) * r.duration_s / 3600.0;
    assert!(
        out.gpu_hours < peak_hours,
        "{} vs {peak_hours}",
        out.gpu_hours
    );
}

/// The speed benchmark of docs/planner.md, timed once by hand (no assertion on time):
/// `cargo test --release -p pdx-sim --test sim -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: 100,000 requests on 256 workers"]
fn bench_100k_requests_on_256_workers() {
    let c = Cluster::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("clusters/bench-256.toml"))
        .unwrap();
    let spec: pdx_sim::workload::Synthetic = "requests=100000,rate=1000,isl=1024,osl=256"
        .parse()
        .unwrap();
    let reqs = pdx_sim::workload::from_trace(spec.trace(), &Default::default()).unwrap();
    let t = std::time::Instant::now();
    let out = Sim::new(&c, &reqs, None, &opts()).unwrap().run();
    let wall = t.elapsed().as_secs_f64();
    assert_eq!(out.report.succeeded, 100_000);
    println!(
        "100,000 requests on 256 workers: {wall:.2} s wall, {:.1} s virtual, {} output tokens",
        out.report.duration_s, out.report.output_tokens_received
    );
}

fn shipped(name: &str) -> Cluster {
    Cluster::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("clusters")
            .join(name),
    )
    .unwrap()
}

#[test]
fn hierarchical_planner_beats_one_pooled_planner_at_the_same_budget() {
    // A shorter run of docs/planner.md's comparison: 90 % short and 10 % long prompts.
    let spec: pdx_sim::workload::Synthetic =
        "requests=9000,rate=60,isl=512,long_isl=12000,long_fraction=0.1,osl=128,seed=3"
            .parse()
            .unwrap();
    let mut trace = spec.trace();
    let curve: pdx_replay::rate::RateCurve = "diurnal:period=150,ratio=4".parse().unwrap();
    pdx_replay::rate::reshape(&mut trace, &curve, None).unwrap();
    let reqs = pdx_sim::workload::from_trace(trace, &Default::default()).unwrap();
    let o = RunOptions {
        slo: Slo {
            ttft_ms: Some(500.0),
            itl_ms: Some(25.0),
        },
        ..opts()
    };
    let run = |name: &str| {
        let c = shipped(name);
        let planner = pdx_sim::planner(&c, None).unwrap();
        assert_eq!(planner.as_ref().unwrap().config().budget_gpus, 24);
        Sim::new(&c, &reqs, planner, &o).unwrap().run()
    };
    let (h, p) = (run("hierarchical.toml"), run("pooled.toml"));
    let (ah, ap) = (
        h.report.slo_attainment.unwrap(),
        p.report.slo_attainment.unwrap(),
    );
    assert!(ah > ap + 0.1, "hierarchical {ah:.3} vs pooled {ap:.3}");
    // Both pools of the hierarchy served their share: the grid split by ISL.
    assert!(h.pools[0].requests > 5 * h.pools[1].requests && h.pools[1].requests > 0);
}

#[test]
fn capped_pool_diverts_to_the_pool_with_headroom_and_attains_more() {
    // Two prefill pools the grid splits at 4096 prompt tokens. "a" gets 2000-token prompts at
    // 60 req/s, "b" 6000-token ones at 1 req/s but must keep 3 replicas (min_replicas): with
    // 5 GPUs, "a" is capped at 2 replicas, below its need, while "b" idles.
    let c = cluster(
        "block_size = 16\n\
         [grid]\nnum_prefill_pools = 2\nnum_decode_pools = 1\n\
         [grid.prefill_pool_selection_strategy]\nttft_min = 10\nttft_max = 1000\nttft_resolution = 1\n\
         isl_min = 0\nisl_max = 8192\nisl_resolution = 2\nprefill_pool_mapping = [[0], [1]]\n\
         [grid.decode_pool_selection_strategy]\nitl_min = 10\nitl_max = 100\nitl_resolution = 1\n\
         context_length_min = 0\ncontext_length_max = 32768\ncontext_length_resolution = 1\n\
         decode_pool_mapping = [[0]]\n\
         [[pools]]\nname = \"a\"\nrole = \"prefill\"\nworkers = 1\nstartup_secs = 5\npolicy = \"least_loaded\"\n\
         profile = { timing = { prefill_token_us = 20.0 } }\n\
         [[pools]]\nname = \"b\"\nrole = \"prefill\"\nworkers = 3\nstartup_secs = 5\npolicy = \"least_loaded\"\n\
         profile = { timing = { prefill_token_us = 20.0 } }\n\
         [[pools]]\nname = \"d\"\nrole = \"decode\"\nworkers = 4\npolicy = \"least_loaded\"\n\
         [planner]\ninterval_secs = 10\nbudget_gpus = 4\npredictor = { kind = \"constant\" }\n\
         [[planner.pools]]\nname = \"a\"\nrole = \"prefill\"\nttft_ms = 500\n\
         [[planner.pools]]\nname = \"b\"\nrole = \"prefill\"\nttft_ms = 500\nmin_replicas = 3\n",
    );
    let mut reqs = Vec::new();
    for i in 0..(120 * 40) {
        reqs.push(req(f64::from(i) / 40.0, 2000, 20));
    }
    for i in 0..120 {
        reqs.push(req(f64::from(i) + 0.005, 6000, 20));
    }
    reqs.sort_by_key(|r| r.arrival_ns);
    let o = RunOptions {
        slo: Slo {
            ttft_ms: Some(500.0),
            itl_ms: None,
        },
        ..opts()
    };
    let run = |no_divert: bool| {
        let planner = pdx_sim::planner(&c, None).unwrap();
        let o = RunOptions {
            no_divert,
            ..o.clone()
        };
        Sim::new(&c, &reqs, planner, &o).unwrap().run()
    };
    let (with, without) = (run(false), run(true));
    for out in [&with, &without] {
        assert_eq!(
            out.report.succeeded, out.report.requests,
            "{:?}",
            out.report.errors
        );
        // Same budget: "a" never had more than 2 replicas, "b" 3.
        assert!(
            out.pools[0].max_workers <= 2 && out.pools[1].max_workers <= 3,
            "{:?}",
            out.pools
        );
    }
    // The planner asked to divert part of "a" to "b", the simulator did, and within "b"'s
    // headroom: "b" (3 replicas, needing a fraction of one) took no more than its 3 spare
    // replicas' worth of "a"'s requests at "a"'s per-replica rate.
    let moved: Vec<_> = with.decisions.iter().flat_map(|d| &d.diversions).collect();
    assert!(!moved.is_empty());
    for v in &moved {
        assert_eq!((v.from.as_str(), v.to.as_str()), ("a", "b"));
        assert!(v.fraction > 0.0 && v.fraction <= 1.0, "{v:?}");
    }
    for d in &with.decisions {
        let (a, b) = (&d.requests[0], &d.requests[1]);
        for v in &d.diversions {
            let spare = f64::from(d.targets[1]) - b.needed;
            assert!(
                v.fraction * a.rate <= spare * a.rate / a.needed + 1e-9,
                "{d:?}"
            );
        }
    }
    assert!(with.pools[0].diverted > 0 && without.pools[0].diverted == 0);
    assert_eq!(with.pools[1].requests, 120 + with.pools[0].diverted);
    // Same budget, better attainment.
    let (aw, an) = (
        with.report.slo_attainment.unwrap(),
        without.report.slo_attainment.unwrap(),
    );
    assert!(aw > an + 0.3, "with diversion {aw:.3}, without {an:.3}");
}
