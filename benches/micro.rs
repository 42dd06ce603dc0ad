//! Micro-benchmarks of the action path's pieces. Names say what they measure.
//! Run: `cargo bench --bench micro`; results are recorded in `benches/results/`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Value};

use data::{crm_response, FILTER_QUERY, SIMPLE_QUERIES};
#[path = "data.rs"]
mod data;

use midcall::exec::Budget;
use midcall::jsonpath::{Conversion, ExtractRule, Extractor};
use midcall::transport::EgressPolicy;
use midcall::{
    ActionSet, Call, CallInfo, MapSecrets, Query, RenderContext, Runtime, StatePath, Syntax,
};

fn call_info() -> CallInfo {
    CallInfo {
        id: "call_bench".into(),
        agent_id: "front-desk".into(),
        tenant: "acme".into(),
        from_number: "+15551234567".into(),
        to_number: "+15557654321".into(),
        is_outgoing: false,
        started_at: "2025-11-03T19:33:18.330Z".into(),
    }
}

fn agent(origin: &str) -> ActionSet {
    let text = format!(
        r#"[agent]
id = "front-desk"
tenant = "acme"
[[actions]]
name = "lookup"
description = "d"
url = "{origin}/v1/customers?phone={{{{call.from_number}}}}&tier={{{{state.customer.tier | default: \"none\"}}}}"
headers = {{ Authorization = "Bearer {{{{secrets.TOKEN}}}}", X-Call = "{{{{call.id}}}}" }}
cache = {{ ttl_s = 300, scope = "tenant" }}
extract = {{ "customer.name" = "$.data.customer.name", "customer.tier" = "$.data.customer.tier" }}
[[actions]]
name = "book"
description = "d"
method = "POST"
url = "{origin}/appointments"
parameters = {{ type = "object", required = ["slot"], properties = {{ slot = {{ type = "string", pattern = "^[0-9]{{2}}:[0-9]{{2}}$" }}, reason = {{ type = "string", maxLength = 200 }}, party = {{ type = "integer", minimum = 1 }} }} }}
body = {{ phone = "{{{{call.from_number}}}}", slot = "{{{{args.slot}}}}", reason = "{{{{args.reason | default: \"checkup\"}}}}", party = "{{{{args.party | default: 1}}}}", note = "Booked by {{{{call.agent_id}}}} for {{{{state.customer.name | default: \"caller\"}}}}" }}
"#
    );
    ActionSet::from_str("bench.toml", &text, Syntax::Toml).unwrap()
}

fn rules(queries: &[(&str, &str)]) -> Extractor {
    Extractor::new(
        queries
            .iter()
            .map(|(t, q)| ExtractRule {
                target: StatePath::parse(t).unwrap(),
                query: Query::compile(q).unwrap(),
                required: false,
                default: None,
                conversion: Conversion::Json,
                all: q.contains('?'),
            })
            .collect(),
    )
}

fn templates(c: &mut Criterion) {
    let set = agent("https://crm.example.com");
    let secrets = MapSecrets::new().with("TOKEN", "tok_123");
    let call = Call::new(call_info());
    let args = json!({"slot": "15:00", "reason": "a \"quoted\" reason", "party": 2});
    let ctx = RenderContext {
        call: &call.info,
        state: &call.state,
        args: &args,
        transcript: &call.transcript,
        secrets: &secrets,
        payload: None,
    };
    let lookup = set.action("lookup").unwrap();
    let book = set.action("book").unwrap();
    c.bench_function("template_render_url_2_values", |b| {
        b.iter(|| {
            lookup
                .url()
                .render(black_box(&ctx), &mut Default::default())
                .unwrap()
        })
    });
    c.bench_function("template_render_header_secret", |b| {
        let (_, t) = &lookup.headers()[0];
        b.iter(|| {
            t.render_header(black_box(&ctx), &mut Default::default())
                .unwrap()
        })
    });
    c.bench_function("template_render_body_5_fields", |b| {
        let body = book.body().unwrap();
        b.iter(|| {
            let mut out = Vec::with_capacity(256);
            body.render(black_box(&ctx), &mut Default::default(), &mut out)
                .unwrap();
            out
        })
    });
    c.bench_function("args_validate_3_fields", |b| {
        b.iter(|| book.validate_args(black_box(&args)).unwrap())
    });
    c.bench_function("render_request_post_with_args", |b| {
        b.iter(|| book.render(black_box(&ctx)).unwrap())
    });
}

fn extraction(c: &mut Criterion) {
    let simple = rules(SIMPLE_QUERIES);
    let paths: Vec<serde_json_path::JsonPath> = SIMPLE_QUERIES
        .iter()
        .map(|(_, q)| serde_json_path::JsonPath::parse(q).unwrap())
        .collect();
    let filter = rules(&[("cheap", FILTER_QUERY)]);
    let mut g = c.benchmark_group("extract");
    for (label, size) in [
        ("1kb", 1024),
        ("13kb", 13 * 1024),
        ("131kb", 131 * 1024),
        ("1mb", 1024 * 1024),
    ] {
        let body = crm_response(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("simple_paths", label), &body, |b, body| {
            b.iter(|| simple.extract_bytes(black_box(body)).unwrap())
        });
        // The baseline the goal is set against: serde_json parse + serde_json_path queries.
        g.bench_with_input(
            BenchmarkId::new("simple_paths_serde_baseline", label),
            &body,
            |b, body| {
                b.iter(|| {
                    let doc: Value = serde_json::from_slice(black_box(body)).unwrap();
                    paths
                        .iter()
                        .map(|p| p.query(&doc).all().first().map(|v| (*v).clone()))
                        .collect::<Vec<_>>()
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("filter_query", label), &body, |b, body| {
            b.iter(|| filter.extract_bytes(black_box(body)).unwrap())
        });
    }
    g.finish();
}

fn state_and_runtime(c: &mut Criterion) {
    let values: Vec<(StatePath, Value)> = (0..5)
        .map(|i| {
            (
                StatePath::parse(&format!("customer.f{i}")).unwrap(),
                json!(format!("value {i}")),
            )
        })
        .collect();
    c.bench_function("state_apply_5_values", |b| {
        b.iter(|| {
            let mut call = Call::new(call_info());
            for (p, v) in &values {
                call.state.set(p, v.clone()).unwrap();
            }
            call
        })
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (origin, _server) = rt.block_on(local_server());
    let set = agent(&origin);
    let runtime = Runtime::builder()
        .egress(loopback())
        .secrets(Arc::new(MapSecrets::new().with("TOKEN", "tok")))
        .dedupe_window(Duration::ZERO)
        .build()
        .unwrap();
    let lookup = set.action("lookup").unwrap().clone();
    rt.block_on(async {
        execute_once(&runtime, &lookup, json!({}), 5).await;
    });
    c.bench_function("exec_cache_hit_outcome_and_state_apply", |b| {
        b.to_async(&rt).iter(|| async {
            let o = execute_once(&runtime, &lookup, json!({}), 5).await;
            assert_eq!(o.status.as_str(), "cache_hit");
            o
        })
    });
    // A dead host: the breaker opens and later actions fail fast.
    let dead = agent("http://127.0.0.1:9");
    let dead_lookup = dead.action("book").unwrap().clone();
    let breaker_rt = Runtime::builder()
        .egress(loopback())
        .breaker_cooldown(Duration::from_secs(3600))
        .build()
        .unwrap();
    rt.block_on(async {
        for _ in 0..5 {
            execute_once(&breaker_rt, &dead_lookup, json!({"slot": "15:00"}), 2).await;
        }
    });
    c.bench_function("exec_breaker_open_fail_fast", |b| {
        b.to_async(&rt).iter(|| async {
            let o = execute_once(&breaker_rt, &dead_lookup, json!({"slot": "15:00"}), 2).await;
            assert_eq!(o.status.as_str(), "circuit_open");
            o
        })
    });
}

/// Plain HTTP to loopback: the benches' own local server.
fn loopback() -> EgressPolicy {
    EgressPolicy::new()
        .allow_http(true)
        .allow_network("127.0.0.0/8".parse().unwrap())
}

/// One tool call of `action` in a fresh call, within `secs`.
async fn execute_once(
    runtime: &Runtime,
    action: &midcall::ActionSpec,
    args: serde_json::Value,
    secs: u64,
) -> midcall::Outcome {
    let mut call = Call::new(call_info());
    runtime
        .execute(
            action,
            &mut call,
            args,
            &Budget::new(Duration::from_secs(secs)),
        )
        .await
}

async fn local_server() -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = String::from_utf8(crm_response(1024)).unwrap();
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            s.set_nodelay(true).unwrap();
            let resp = resp.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://127.0.0.1:{}", addr.port()), task)
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(30);
    targets = templates, extraction, state_and_runtime
}
criterion_main!(benches);
