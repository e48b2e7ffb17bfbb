//! Micro-benchmarks of the pure core: `apply` and the read index.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use muster_core::{Command, DiscoverFilter, InstanceSpec, Registry, ServiceKey};

fn spec(service: usize, id: usize) -> InstanceSpec {
    InstanceSpec {
        service: format!("svc-{service}"),
        instance_id: format!("i-{id}"),
        address: "10.0.0.1".into(),
        port: 8080,
        tags: vec!["v1".into(), "blue".into()],
        metadata: [("version".to_string(), "1.2.3".to_string())].into(),
        ..Default::default()
    }
}

fn registry(instances: usize) -> Registry {
    let mut r = Registry::new();
    for i in 0..instances {
        r.apply(&Command::Register {
            spec: spec(i % 1000, i),
            grant_ttl_ms: None,
            now_ms: 1,
        });
    }
    r
}

fn bench(c: &mut Criterion) {
    let base = registry(100_000);
    c.bench_function("apply register into 100k", |b| {
        b.iter_batched(
            || {
                (
                    base.clone(),
                    Command::Register {
                        spec: spec(7, 1_000_000),
                        grant_ttl_ms: Some(10_000),
                        now_ms: 2,
                    },
                )
            },
            |(mut r, cmd)| {
                let applied = r.apply(&cmd);
                (r, applied)
            },
            BatchSize::LargeInput,
        )
    });
    let mut r = registry(10_000);
    let mut n = 0usize;
    c.bench_function("apply register (update) at 10k", |b| {
        b.iter(|| {
            n += 1;
            black_box(r.apply(&Command::Register {
                spec: spec(n % 1000, n % 10_000),
                grant_ttl_ms: None,
                now_ms: 3,
            }))
        })
    });
    let key = ServiceKey::new("", "svc-7");
    let all = DiscoverFilter::default();
    c.bench_function("discover 100 instances of one service in 100k", |b| {
        b.iter(|| black_box(base.discover(&key, &all).len()))
    });
    let tagged = DiscoverFilter {
        tags: vec!["blue".into()],
        ..Default::default()
    };
    c.bench_function("discover with a tag filter in 100k", |b| {
        b.iter(|| black_box(base.discover(&key, &tagged).len()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
