//! One definition of a behaviour test, run against every engine.
//!
//! A behaviour test is a plain function taking the [`Engine`] to open its
//! store on; one [`engine_tests!`] list per test file turns each into one
//! `#[test]` per engine, in a module named after the engine, so that the
//! test name says which engine failed:
//! `original_suite::redis::a_message_appears_for_its_user_once`.
//!
//! ```ignore
//! fn a_message_appears_for_its_user_once(engine: Engine) -> Result<()> {
//!     let store = engine.open()?; // derefs to `MessageStore`
//!     // ...
//!     Ok(())
//! }
//!
//! engine_tests! {
//!     a_message_appears_for_its_user_once,
//!     // Attributes go on each engine's test.
//!     #[ignore = "long run"]
//!     model_long,
//!     // Only on these engines (a promise the others cannot keep).
//!     survives_the_process_dying: Sled | Redis,
//! }
//! ```
//!
//! The functions stay outside the macro, so that rustfmt and the compiler's
//! messages see them as ordinary code.
//!
//! The Redis tests exist with feature `redis`; each starts its own
//! `redis-server` (a few milliseconds), and is skipped (or, with env `CI`,
//! fails) when `redis-server` is not on `PATH`.

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_messages::{Builder, Durability, MessageStore, Result};

use super::TestDir;
use super::redis::RedisServer;

/// The engines a store can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `MessageStore::builder().path(..)`: a fresh temporary directory.
    Sled,
    /// `MessageStore::builder().in_memory()`.
    Memory,
    /// `MessageStore::builder().redis(..).namespace(..)`: a `redis-server`
    /// of the test's own, one namespace per store.
    Redis,
}

impl Engine {
    /// Whether the engine can run here. Redis needs `redis-server` on
    /// `PATH`: without it this reports a skip (a failure with env `CI`) and
    /// returns `false`.
    pub fn available(self) -> bool {
        match self {
            Engine::Sled | Engine::Memory => true,
            Engine::Redis => {
                if super::redis::redis_server_path().is_some() {
                    return true;
                }
                super::missing_prerequisite(
                    "redis-server is not on PATH (apt-get install -y redis-server)",
                );
                false
            }
        }
    }

    /// A source of fresh, empty stores on this engine (for Redis: one
    /// server, a new namespace per store). Use it for many stores in one
    /// test, such as one per proptest case.
    pub fn stores(self) -> Stores {
        let server = match self {
            Engine::Redis => Some(Arc::new(RedisServer::start())),
            Engine::Sled | Engine::Memory => None,
        };
        Stores {
            engine: self,
            server,
            namespaces: AtomicU64::new(0),
        }
    }

    /// A fresh, empty store with the default settings (on sled:
    /// [`Durability::Immediate`]).
    pub fn open(self) -> Result<Fixture> {
        self.stores().open()
    }

    /// A fresh store with [`fast`] settings.
    pub fn open_fast(self) -> Result<Fixture> {
        self.stores().open_with(fast)
    }

    /// A fresh store with settings of the test's own (`min_level`,
    /// `max_message_bytes`, `lease_timeout`, ...), applied after the
    /// engine's place. Settings of another engine (sled's `durability` or
    /// `index_slots` on Redis) are ignored by the store.
    pub fn open_with(self, configure: impl FnOnce(Builder) -> Builder) -> Result<Fixture> {
        self.stores().open_with(configure)
    }
}

/// Periodic durability: faster on sled, for tests that do not test
/// durability (`TestDir::open_fast`); nothing changes on the other engines.
pub fn fast(builder: Builder) -> Builder {
    builder.durability(Durability::Periodic(Duration::from_millis(100)))
}

/// Fresh stores on one engine; see [`Engine::stores`].
pub struct Stores {
    engine: Engine,
    server: Option<Arc<RedisServer>>,
    namespaces: AtomicU64,
}

impl Stores {
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// A fresh, empty store with the default settings.
    pub fn open(&self) -> Result<Fixture> {
        self.open_with(|builder| builder)
    }

    /// A fresh, empty store with [`fast`] settings.
    pub fn open_fast(&self) -> Result<Fixture> {
        self.open_with(fast)
    }

    /// A fresh, empty store with the test's settings.
    pub fn open_with(&self, configure: impl FnOnce(Builder) -> Builder) -> Result<Fixture> {
        let mut dir = None;
        let place = match (self.engine, &self.server) {
            (Engine::Sled, _) => {
                let test_dir = TestDir::new();
                let path = test_dir.store_path();
                dir = Some(test_dir);
                Place::Sled(path)
            }
            (Engine::Memory, _) => Place::Memory,
            (Engine::Redis, Some(server)) => {
                let n = self.namespaces.fetch_add(1, Ordering::Relaxed);
                Place::Redis {
                    url: server.url(),
                    namespace: format!("test{n}"),
                }
            }
            (Engine::Redis, None) => unreachable!("a Redis Stores has a server"),
        };
        let builder = configure(place.builder());
        let store = builder.clone().open()?;
        Ok(Fixture {
            store: Some(store),
            engine: self.engine,
            place,
            builder,
            server: self.server.clone(),
            _dir: dir,
        })
    }
}

/// Where a store lives.
#[derive(Debug, Clone)]
enum Place {
    Sled(PathBuf),
    Memory,
    Redis { url: String, namespace: String },
}

impl Place {
    fn builder(&self) -> Builder {
        match self {
            Place::Sled(path) => MessageStore::builder().path(path),
            Place::Memory => MessageStore::builder().in_memory(),
            Place::Redis { url, namespace } => {
                MessageStore::builder().redis(url).namespace(namespace)
            }
        }
    }
}

/// The environment variables that tell a child process which store to open.
const CHILD_SLED: &str = "ASYNC_MESSAGES_TEST_SLED";
const CHILD_REDIS: &str = "ASYNC_MESSAGES_TEST_REDIS";
const CHILD_NAMESPACE: &str = "ASYNC_MESSAGES_TEST_NAMESPACE";

/// In a child process started with [`Fixture::child_env`]: the builder of
/// the parent's store, to which the child adds its settings; `None` when
/// this process is not such a child.
pub fn child_builder() -> Option<Builder> {
    if let Some(path) = std::env::var_os(CHILD_SLED) {
        return Some(Place::Sled(path.into()).builder());
    }
    let url = std::env::var(CHILD_REDIS).ok()?;
    let namespace = std::env::var(CHILD_NAMESPACE).ok()?;
    Some(Place::Redis { url, namespace }.builder())
}

/// A fresh store and what keeps it alive: its directory (sled) or its
/// server (Redis), removed or killed when the fixture is dropped. Derefs to
/// the [`MessageStore`].
pub struct Fixture {
    // Field order is drop order: the store goes before its directory or
    // server.
    store: Option<MessageStore>,
    engine: Engine,
    place: Place,
    builder: Builder,
    server: Option<Arc<RedisServer>>,
    _dir: Option<TestDir>,
}

impl Fixture {
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The store's handle.
    pub fn store(&self) -> &MessageStore {
        self.store.as_ref().expect("the store is open")
    }

    /// The Redis server, on Redis.
    pub fn server(&self) -> Option<&RedisServer> {
        self.server.as_deref()
    }

    /// Closes the store and opens it again with the same settings: sled
    /// reopens its directory; Redis opens a new handle on the same server
    /// and namespace. In memory a store cannot outlive its handles, so
    /// there is no reopen: the same store stays open (the checks that
    /// follow a reopen then run on it). Clones of the old handle must be
    /// dropped first (sled refuses a second handle in one process).
    pub fn reopen(&mut self) -> Result<()> {
        if self.engine == Engine::Memory {
            return Ok(());
        }
        drop(self.store.take());
        self.store = Some(self.builder.clone().open()?);
        Ok(())
    }

    /// The store's namespace, on Redis.
    pub fn namespace(&self) -> Option<&str> {
        match &self.place {
            Place::Redis { namespace, .. } => Some(namespace),
            Place::Sled(_) | Place::Memory => None,
        }
    }

    /// Closes the store (drops this handle): on sled, so that another
    /// process can open it. [`reopen`](Self::reopen) opens it again; until
    /// then the fixture has no store. Not in memory, where closing loses
    /// everything.
    pub fn close(&mut self) {
        assert_ne!(
            self.engine,
            Engine::Memory,
            "a store in memory cannot be closed and reopened"
        );
        drop(self.store.take());
    }

    /// The environment variables with which a child process opens this
    /// store (see [`child_builder`]). Close a sled store first.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        match &self.place {
            Place::Sled(path) => vec![(CHILD_SLED, path.display().to_string())],
            Place::Redis { url, namespace } => vec![
                (CHILD_REDIS, url.clone()),
                (CHILD_NAMESPACE, namespace.clone()),
            ],
            Place::Memory => panic!("a store in memory cannot be opened by another process"),
        }
    }

    /// Another handle on the same store: on Redis a second store opened on
    /// the same URL and namespace (as another process would); on sled,
    /// which allows one handle per process, and in memory, a clone of this
    /// one.
    pub fn another_handle(&self) -> Result<MessageStore> {
        match self.engine {
            Engine::Redis => self.builder.clone().open(),
            Engine::Sled | Engine::Memory => Ok(self.store().clone()),
        }
    }
}

impl Deref for Fixture {
    type Target = MessageStore;

    fn deref(&self) -> &MessageStore {
        self.store()
    }
}

/// What a skipped test returns: `()` or `Ok(())`.
pub trait Skipped {
    fn skipped() -> Self;
}

impl Skipped for () {
    fn skipped() -> Self {}
}

impl<E> Skipped for std::result::Result<(), E> {
    fn skipped() -> Self {
        Ok(())
    }
}

/// Runs a behaviour test on `engine`, or skips it (see
/// [`Engine::available`]).
pub fn run<T: Skipped>(engine: Engine, test: fn(Engine) -> T) -> T {
    if !engine.available() {
        return T::skipped();
    }
    test(engine)
}

/// One `#[test]` per engine for each generic test named; see the module
/// docs.
#[macro_export]
macro_rules! engine_tests {
    // `$item` when the engine is in the list, or the list is empty (all).
    (@when $engine:ident [] $item:item) => { $item };
    (@when $engine:ident [$($only:ident)+] $item:item) => {
        $crate::engine_tests!(@find $engine [$($only)+] $item);
    };
    (@find Sled [Sled $($rest:ident)*] $item:item) => { $item };
    (@find Memory [Memory $($rest:ident)*] $item:item) => { $item };
    (@find Redis [Redis $($rest:ident)*] $item:item) => { $item };
    (@find $engine:ident [$first:ident $($rest:ident)*] $item:item) => {
        $crate::engine_tests!(@find $engine [$($rest)*] $item);
    };
    (@find $engine:ident [] $item:item) => {};

    // The tests of one engine, in a module named after it.
    (@module $module:ident $engine:ident
        $( [$(#[$meta:meta])*] $name:ident [$($only:ident)*] )*
    ) => {
        mod $module {
            $(
                $crate::engine_tests!(@when $engine [$($only)*]
                    $(#[$meta])*
                    #[test]
                    fn $name() -> impl std::process::Termination {
                        $crate::common::engines::run(
                            $crate::common::engines::Engine::$engine,
                            super::$name,
                        )
                    }
                );
            )*
        }
    };

    (
        $(
            $(#[$meta:meta])*
            $name:ident $(: $($only:ident)|+)?
        ),* $(,)?
    ) => {
        $crate::engine_tests!(@module sled Sled
            $( [$(#[$meta])*] $name [$($($only)+)?] )*);
        $crate::engine_tests!(@module memory Memory
            $( [$(#[$meta])*] $name [$($($only)+)?] )*);
        #[cfg(feature = "redis")]
        $crate::engine_tests!(@module redis Redis
            $( [$(#[$meta])*] $name [$($($only)+)?] )*);
        // A test of Redis only is not dead code without feature `redis`.
        const _: () = {
            $(let _ = $name;)*
        };
    };
}
