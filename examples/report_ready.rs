//! The first example to run: a background job tells a user "your report is
//! ready", and the user's next request shows it, once.
//!
//! ```text
//! cargo run --example report_ready
//! ```

use std::thread;
use std::time::Duration;

use async_messages::{Level, MessageStore};

fn main() -> Result<(), async_messages::Error> {
    let dir = std::env::temp_dir().join(format!("async-messages-report-{}", std::process::id()));
    let store = MessageStore::open(&dir)?;

    // A request starts an expensive job in the background...
    let job_store = store.clone();
    let job = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200)); // building the report
        job_store.success("barry", "Barry, your report is ready")
    });

    // ...the user keeps browsing: nothing to show yet.
    println!(
        "request 1 shows: {:?}",
        texts(&store.get_messages("barry")?)
    );
    job.join().expect("the job thread panicked")?;

    // The next request shows the message, the one after that does not.
    for message in store.get_messages("barry")? {
        println!("request 2 shows: [{}] {}", message.level(), message.text());
    }
    println!(
        "request 3 shows: {:?}",
        texts(&store.get_messages("barry")?)
    );

    // Many users at once, all or nothing; the text is stored once.
    let staff = 1..=1000_u64;
    let sent = store.message_users(staff, "All budgets must be spent by Friday", Level::Warning)?;
    println!(
        "queued for {} staff; user 7 sees {:?}",
        sent.recipients(),
        texts(&store.get_messages(7_u64)?)
    );

    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn texts(messages: &[async_messages::Message]) -> Vec<&str> {
    messages.iter().map(|m| m.text()).collect()
}
