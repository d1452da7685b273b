//! Criterion benchmarks of the hot paths, for tracking changes over time.
//! For the comparison with raw sled and SQLite see `benches/compare.rs`.
//!
//! ```text
//! cargo bench --bench hot_paths
//! ```

use std::hint::black_box;
use std::time::Duration;

use async_messages::{Durability, Level, MessageStore};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const TEXT: &str = "Your export of 2026-11-26 is ready: download it from the reports page.";

fn open(dir: &tempfile::TempDir, durability: Durability) -> MessageStore {
    MessageStore::builder()
        .path(dir.path().join("store"))
        .durability(durability)
        .open()
        .expect("open the store")
}

fn periodic() -> Durability {
    Durability::Periodic(Duration::from_millis(500))
}

fn message_user(c: &mut Criterion) {
    let mut group = c.benchmark_group("message_user");
    group.throughput(Throughput::Elements(1));
    for (name, durability) in [
        ("periodic", periodic()),
        ("immediate", Durability::Immediate),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(&dir, durability);
        let mut user = 0_u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                user += 1;
                black_box(store.message_user(user, TEXT, Level::Info).expect("send"))
            });
        });
    }
    group.finish();
}

fn get_messages(c: &mut Criterion) {
    let mut group = c.benchmark_group("get_messages");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir, periodic());
    // Other users have messages queued, as in a live store.
    store
        .message_users(0..100_000_u64, TEXT, Level::Info)
        .expect("background send");
    let mut never = 1_u64 << 40;
    group.bench_function("empty", |b| {
        b.iter(|| {
            never += 1;
            black_box(store.get_messages(never).expect("drain"))
        });
    });
    for queued in [1_u64, 3] {
        let mut user = 1_u64 << 41;
        group.bench_function(format!("{queued}_queued"), |b| {
            b.iter_batched(
                || {
                    user += 1;
                    for _ in 0..queued {
                        store.message_user(user, TEXT, Level::Info).expect("send");
                    }
                    user
                },
                |user| {
                    let got = store.get_messages(user).expect("drain");
                    assert_eq!(got.len() as u64, queued);
                    got
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn message_users(c: &mut Criterion) {
    let mut group = c.benchmark_group("message_users");
    group.throughput(Throughput::Elements(10_000));
    group.sample_size(20);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir, Durability::Immediate);
    let mut first = 0_u64;
    group.bench_function("10k", |b| {
        b.iter(|| {
            first += 10_000;
            black_box(
                store
                    .message_users(first..first + 10_000, TEXT, Level::Info)
                    .expect("bulk send"),
            )
        });
    });
    group.finish();
}

/// Issue 12's paths: a keyed send that replaces the queued message, a send
/// with an expiry, and reads while an announcement is live.
fn compose(c: &mut Criterion) {
    let mut group = c.benchmark_group("compose");
    group.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir, periodic());
    let mut count = 0_u64;
    group.bench_function("replace_key_same_user", |b| {
        b.iter(|| {
            count += 1;
            black_box(
                store
                    .compose(format!("{count} new comments"), Level::Info)
                    .replace_key("comments")
                    .to_user(1_u64)
                    .expect("keyed send"),
            )
        });
    });
    assert_eq!(store.count(1_u64).expect("count"), 1, "one message left");
    let mut user = 1_u64 << 40;
    group.bench_function("expires_after", |b| {
        b.iter(|| {
            user += 1;
            black_box(
                store
                    .compose(TEXT, Level::Info)
                    .expires_after(Duration::from_secs(3600))
                    .to_user(user)
                    .expect("send"),
            )
        });
    });
    store
        .compose("Maintenance tonight from 22:00", Level::Warning)
        .expires_after(Duration::from_secs(3600))
        .to_everyone()
        .expect("announcement");
    let mut visitor = 1_u64 << 42;
    group.bench_function("first_drain_with_announcement", |b| {
        b.iter(|| {
            visitor += 1;
            let got = store.get_messages(visitor).expect("drain");
            assert_eq!(got.len(), 1);
            got
        });
    });
    group.bench_function("drain_after_announcement_taken", |b| {
        b.iter(|| black_box(store.get_messages(visitor).expect("drain")));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = message_user, get_messages, message_users, compose
}
criterion_main!(benches);
