use async_messages::{Durability, Level, MessageStore};
use std::time::{Duration, Instant};
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::builder()
        .path(dir.path().join("s"))
        .durability(Durability::Periodic(Duration::from_millis(500)))
        .open()
        .unwrap();
    let n = 1_000_000u64;
    let t = Instant::now();
    store
        .message_users((0..n).filter(|i| i % 5 != 0), "bulk text", Level::Info)
        .unwrap();
    eprintln!("bulk {:?}", t.elapsed());
    let samples = 10_000u64;
    for k in 0..samples {
        store
            .message_user(k * 97 + 1, "direct", Level::Info)
            .unwrap();
    }
    let mut ns = Vec::new();
    for k in 0..samples {
        let t = Instant::now();
        let got = store.get_messages(k * 97 + 1).unwrap();
        ns.push(t.elapsed().as_nanos() as u64);
        assert!(got.len() >= 1);
    }
    ns.sort();
    eprintln!(
        "p50 {} p90 {} p99 {} max {}",
        ns[ns.len() / 2],
        ns[ns.len() * 9 / 10],
        ns[ns.len() * 99 / 100],
        ns[ns.len() - 1]
    );
}
