//! The global planner's diversions on the live router: `PUT`/`GET /v1/planner/diversions`, applied to the
//! prefill pool choice by the deterministic counter, refused when malformed, guarded by the admin token.

mod common;
use common::*;
use http_body_util::BodyExt;

const TOKEN: &str = "Bearer s3cret";

async fn admin(
    r: &pdx_router::RouterServer,
    method: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let h: Vec<(&str, &str)> = auth.map(|t| vec![("authorization", t)]).unwrap_or_default();
    let resp = send(
        r.addr,
        method,
        "/v1/planner/diversions",
        &h,
        body.to_string(),
    )
    .await;
    let s = resp.status().as_u16();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&b)));
    (s, v)
}

async fn register(r: &pdx_router::RouterServer, role: &str, pool: &str, m: &pdx_mock::MockServer) {
    let reg = serde_json::json!({"role": role, "pool": pool, "url": url(m), "model": "mock"});
    let resp = send(
        r.addr,
        "POST",
        "/v1/workers",
        &[("authorization", TOKEN)],
        reg.to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200, "registering {pool}");
}

fn prefill_choices(r: &pdx_router::RouterServer, pool: &str) -> f64 {
    sample(
        &router_metrics(r),
        "pdx_pool_choices_total",
        &format!("role=\"prefill\",pool=\"{pool}\""),
    )
}

#[tokio::test(flavor = "current_thread")]
async fn half_of_a_prefill_pool_is_diverted_exactly() {
    let pa = mock(&["--role", "prefill", "--instant"]);
    let pb = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = router(&["--admin-token", "s3cret"]);
    // Registration order is pool order: without a grid, every request starts at `pa`.
    register(&r, "prefill", "pa", &pa).await;
    register(&r, "prefill", "pb", &pb).await;
    register(&r, "decode", "dec", &d).await;

    let run = |n: usize| {
        let addr = r.addr;
        async move {
            for _ in 0..n {
                let (s, b) = call(
                    addr,
                    "POST",
                    "/v1/chat/completions",
                    &chat(2, false).to_string(),
                )
                .await;
                assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
            }
        }
    };
    run(4).await;
    assert_eq!(prefill_choices(&r, "pa"), 4.0);
    assert_eq!(prefill_choices(&r, "pb"), 0.0);

    let (s, v) = admin(
        &r,
        "PUT",
        Some(TOKEN),
        r#"{"model":"mock","diversions":[{"from":"pa","to":"pb","fraction":0.5}]}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = admin(&r, "GET", Some(TOKEN), "").await;
    assert_eq!(s, 200);
    assert_eq!(v["diversions"][0]["from"], "pa");
    assert_eq!(v["diversions"][0]["to"], "pb");
    assert_eq!(v["diversions"][0]["role"], "prefill");
    assert_eq!(v["diversions"][0]["fraction"], 0.5);

    // 11 requests at 0.5: requests 2, 4, ..., 10 (1-based) go, floor(11 / 2) = 5.
    run(11).await;
    assert_eq!(prefill_choices(&r, "pb"), 5.0);
    assert_eq!(prefill_choices(&r, "pa"), 4.0 + 6.0);
    let m = router_metrics(&r);
    assert_eq!(
        sample(&m, "pdx_planner_diverted_total", "from=\"pa\",to=\"pb\""),
        5.0,
        "{m}"
    );

    // The same decision re-sent keeps its counter (the 12th request is diverted); an empty list clears.
    let same = r#"{"diversions":[{"from":"pa","to":"pb","fraction":0.5}]}"#;
    assert_eq!(admin(&r, "PUT", Some(TOKEN), same).await.0, 200);
    run(1).await;
    assert_eq!(prefill_choices(&r, "pb"), 6.0);
    assert_eq!(
        admin(&r, "PUT", Some(TOKEN), r#"{"diversions":[]}"#)
            .await
            .0,
        200
    );
    assert_eq!(
        admin(&r, "GET", Some(TOKEN), "").await.1["diversions"],
        serde_json::json!([])
    );
    run(3).await;
    assert_eq!(prefill_choices(&r, "pb"), 6.0);
    assert_eq!(prefill_choices(&r, "pa"), 13.0);
}

#[tokio::test(flavor = "current_thread")]
async fn bad_diversions_are_refused_and_the_token_guards_them() {
    let pa = mock(&["--role", "prefill", "--instant"]);
    let pb = mock(&["--role", "prefill", "--instant"]);
    let d = mock(&["--role", "decode", "--instant"]);
    let r = router(&["--admin-token", "s3cret"]);
    register(&r, "prefill", "pa", &pa).await;
    register(&r, "prefill", "pb", &pb).await;
    register(&r, "decode", "dec", &d).await;

    let ok = r#"{"diversions":[{"from":"pa","to":"pb","fraction":0.25}]}"#;
    assert_eq!(admin(&r, "PUT", None, ok).await.0, 401);
    assert_eq!(admin(&r, "PUT", Some("Bearer nope"), ok).await.0, 401);
    assert_eq!(admin(&r, "GET", None, "").await.0, 401);

    let many: Vec<serde_json::Value> = (0..65)
        .map(|_| serde_json::json!({"from":"pa","to":"pb","fraction":0.5}))
        .collect();
    let many = serde_json::json!({ "diversions": many }).to_string();
    let bad = [
        "{",
        "[]",
        r#"{"diversions":{}}"#,
        r#"{"model":"mock"}"#,
        r#"{"diversions":[],"extra":1}"#,
        r#"{"model":"nope","diversions":[{"from":"pa","to":"pb","fraction":0.5}]}"#,
        r#"{"diversions":[{"from":"pa","to":"pb"}]}"#,
        r#"{"diversions":[{"from":"pa","to":"pb","fraction":0.5,"x":1}]}"#,
        r#"{"diversions":[{"from":"pa","to":"pb","fraction":0}]}"#,
        r#"{"diversions":[{"from":"pa","to":"pb","fraction":1.5}]}"#,
        r#"{"diversions":[{"from":"pa","to":"pb","fraction":-0.1}]}"#,
        r#"{"diversions":[{"from":"pa","to":"pb","fraction":"0.5"}]}"#,
        r#"{"diversions":[{"from":"pa","to":"pa","fraction":0.5}]}"#,
        r#"{"diversions":[{"from":"pa","to":"nope","fraction":0.5}]}"#,
        r#"{"diversions":[{"from":"nope","to":"pb","fraction":0.5}]}"#,
        r#"{"diversions":[{"from":"pa","to":"dec","fraction":0.5}]}"#,
        r#"{"diversions":[{"from":"pa","to":"pb","fraction":0.5},{"from":"pa","to":"pb","fraction":0.2}]}"#,
        &many,
    ];
    for b in bad {
        let (s, v) = admin(&r, "PUT", Some(TOKEN), b).await;
        assert_eq!(s, 400, "{b}: {v}");
        assert_eq!(v["error"]["code"], 400, "{b}: {v}");
    }
    assert_eq!(admin(&r, "DELETE", Some(TOKEN), "").await.0, 405);
    // Clearing a model no worker serves (yet) is trivially done.
    let (s, v) = admin(
        &r,
        "PUT",
        Some(TOKEN),
        r#"{"model":"later","diversions":[]}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // Nothing refused was stored; a good body is.
    assert_eq!(
        admin(&r, "GET", Some(TOKEN), "").await.1["diversions"],
        serde_json::json!([])
    );
    assert_eq!(admin(&r, "PUT", Some(TOKEN), ok).await.0, 200);
    let v = admin(&r, "GET", Some(TOKEN), "").await.1;
    assert_eq!(v["diversions"].as_array().map(Vec::len), Some(1), "{v}");
}
