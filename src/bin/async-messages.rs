//! `async-messages`: queue, inspect, export and check a message store from
//! a shell (feature `cli`).
//!
//! STORE is a store's directory or a `redis://` / `rediss://` URL. Exit
//! codes: 0 success, 1 an error (one sentence on stderr), 2 a usage error.
//! See README's "Command-line tool" section.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

/// `println!` that turns a failed write to stdout (a closed pipe) into a
/// [`Failure`] returned from the calling function, instead of a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::write_failure)?
    }};
}

// A crate root looks for its modules beside it, where cargo would take
// them for binaries of their own: they live in a directory named after it.
#[path = "async-messages/commands.rs"]
mod commands;
#[path = "async-messages/json.rs"]
mod json;
#[path = "async-messages/ndjson.rs"]
mod ndjson;
#[path = "async-messages/target.rs"]
mod target;
#[path = "async-messages/text.rs"]
mod text;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::target::Target;

/// Queue messages for users of an app built on async-messages, and look
/// inside its store.
///
/// STORE is the store's directory, or a redis:// or rediss:// URL (Redis
/// needs a build with the `redis` feature). USER made of digits is an
/// integer id, anything else a string id (--string-id forces a string).
///
/// `send` works while the app runs: on a directory it goes through the
/// store's spool, which the app takes in within milliseconds (or at its next
/// open). The other commands open the store itself, which sled allows one
/// process at a time: on a directory they need the app stopped, and say so.
///
/// Exit codes: 0 success, 1 an error (one sentence on stderr), 2 a usage
/// error.
#[derive(Debug, Parser)]
#[command(name = "async-messages", version, max_term_width = 100)]
struct Cli {
    /// On a Redis store, the prefix of its keys: the app's
    /// `Builder::namespace` (only for a redis:// STORE).
    #[arg(long, global = true, value_name = "NS")]
    namespace: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Queue a message for a user, or for everyone; works while the app runs.
    ///
    /// On a directory, the message is written to the store's spool (created
    /// if missing) and is durable when this returns; the app takes it in
    /// within milliseconds, or at its next open. On Redis it is stored
    /// directly. The store's minimum level still applies (by default a debug
    /// message is dropped). A TEXT that begins with '-' goes after `--`.
    ///
    /// With --everyone (and no USER) it is an announcement: every user who
    /// loads a page before it expires gets it once, users the store has
    /// never seen included. Give announcements an --expires-after.
    #[command(after_long_help = text::SEND_HELP, allow_missing_positional = true)]
    Send(SendArgs),
    /// Show a user's queued messages, oldest first, without removing them.
    #[command(after_long_help = json::PEEK_HELP)]
    Peek {
        #[command(flatten)]
        user: UserArgs,
        /// Print one JSON object (fields below) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print how many messages a user has queued (a bare number).
    Count {
        #[command(flatten)]
        user: UserArgs,
    },
    /// Summarise the store: users with messages, messages, bulk records,
    /// size on disk, quarantined records.
    #[command(after_long_help = json::STATS_HELP)]
    Stats {
        #[command(flatten)]
        store: StoreArg,
        /// Print one JSON object (fields below) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write every queued message as NDJSON on stdout, in (user, send
    /// order) order, without removing anything.
    #[command(after_long_help = json::EXPORT_HELP)]
    Export {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Queue the messages of an export (NDJSON on stdin) into a store,
    /// creating it if missing.
    ///
    /// Lines that share an id (one send to many users) become one send
    /// again, stored once; sends go in the order of their original ids, so
    /// each user's messages keep their order. The whole input is checked
    /// before anything is stored. New ids and send times are given.
    #[command(after_long_help = json::EXPORT_HELP)]
    Import {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Remove every message queued for a user and print how many.
    Purge {
        #[command(flatten)]
        user: UserArgs,
    },
    /// Read every record; report damage and the quarantine.
    ///
    /// Opening the store moves records with a damaged key to quarantine;
    /// reading every user's queue then moves any damaged message, shared
    /// text or bulk record there too, and the reading goes on. Exit code 0
    /// when the store could be read, damaged records or not (the report
    /// says which were found); 1 when it cannot be opened or read.
    #[command(after_long_help = json::CHECK_HELP)]
    Check {
        #[command(flatten)]
        store: StoreArg,
        /// Print one JSON object (fields below) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct StoreArg {
    /// The store's directory, or a redis:// or rediss:// URL.
    #[arg(value_name = "STORE")]
    store: String,
}

#[derive(Debug, Args)]
struct UserArgs {
    /// The store's directory, or a redis:// or rediss:// URL.
    #[arg(value_name = "STORE")]
    store: String,
    /// The user: digits are an integer id, anything else a string id.
    #[arg(value_name = "USER")]
    user: String,
    /// Take USER as a string id even when it is made of digits.
    #[arg(long)]
    string_id: bool,
}

#[derive(Debug, Args)]
struct SendArgs {
    /// The store's directory, or a redis:// or rediss:// URL.
    #[arg(value_name = "STORE")]
    store: String,
    /// The user: digits are an integer id, anything else a string id.
    /// Left out with --everyone.
    #[arg(
        value_name = "USER",
        required_unless_present = "everyone",
        conflicts_with = "everyone"
    )]
    user: Option<String>,
    /// The message text (at most 64 KiB).
    #[arg(value_name = "TEXT")]
    text: String,
    /// Take USER as a string id even when it is made of digits.
    #[arg(long, conflicts_with = "everyone")]
    string_id: bool,
    /// Send to every user (an announcement) instead of one USER.
    #[arg(long)]
    everyone: bool,
    /// debug, info, success, warning or error (or 10, 20, 25, 30, 40).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    level: String,
    /// Drop the message, undelivered, once this long has passed since now:
    /// 90s, 15m, 12h, 7days, "1h 30m" (from 1 ms to 3650 days).
    #[arg(long, value_name = "DURATION")]
    expires_after: Option<String>,
    /// A key naming what the message is about, such as report:42: it
    /// replaces the user's queued message with the same key (at most 256
    /// bytes).
    #[arg(long, value_name = "KEY")]
    replace_key: Option<String>,
}

/// Why a command failed: a sentence for stderr, or nothing to say (stdout
/// was closed under us, as by `export | head`).
#[derive(Debug)]
enum Failure {
    Said(String),
    Quiet,
}

impl From<String> for Failure {
    fn from(sentence: String) -> Self {
        Failure::Said(sentence)
    }
}

fn write_failure(error: std::io::Error) -> Failure {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        // The reader went away (`export | head`): nothing to tell it.
        Failure::Quiet
    } else {
        format!("cannot write to stdout: {error}").into()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Said(sentence)) => {
            eprintln!("error: {sentence}");
            ExitCode::FAILURE
        }
        Err(Failure::Quiet) => ExitCode::FAILURE,
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let namespace = cli.namespace;
    let target = |store: &str| {
        let target = Target::parse(store, namespace.as_deref())?;
        if namespace.is_some() && !target.is_redis() {
            // A usage error (exit code 2), in clap's words and format.
            Cli::command()
                .error(
                    ErrorKind::ArgumentConflict,
                    "--namespace applies only to a redis:// or rediss:// STORE",
                )
                .exit();
        }
        Ok::<_, Failure>(target)
    };
    match cli.command {
        Command::Send(args) => {
            let target = target(&args.store)?;
            let to = match &args.user {
                Some(user) => commands::To::User(target::user_id(user, args.string_id)?),
                None => commands::To::Everyone,
            };
            commands::send(
                &target,
                &to,
                args.text,
                &commands::SendOptions {
                    level: &args.level,
                    expires_after: args.expires_after.as_deref(),
                    replace_key: args.replace_key.as_deref(),
                },
            )
        }
        Command::Peek { user, json } => {
            let target = target(&user.store)?;
            let id = target::user_id(&user.user, user.string_id)?;
            commands::peek(&target, &id, json)
        }
        Command::Count { user } => {
            let target = target(&user.store)?;
            let id = target::user_id(&user.user, user.string_id)?;
            commands::count(&target, &id)
        }
        Command::Stats { store, json } => commands::stats(&target(&store.store)?, json),
        Command::Export { store } => commands::export(&target(&store.store)?),
        Command::Import { store } => commands::import(&target(&store.store)?),
        Command::Purge { user } => {
            let target = target(&user.store)?;
            let id = target::user_id(&user.user, user.string_id)?;
            commands::purge(&target, &id)
        }
        Command::Check { store, json } => commands::check(&target(&store.store)?, json),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    // clap's own check of the derived definitions (names, positions).
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
