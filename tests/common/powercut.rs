//! A file system that forgets everything not synced: a simulated power cut
//! for durability tests. It follows LazyFS's idea, kept in memory and
//! served over FUSE by the test process itself with the `fuser` crate (its
//! own mount code; as root it needs neither libfuse nor `fusermount3`).
//!
//! # The model
//!
//! - Every file has *live* contents (what reads see) and *durable* contents
//!   (what survives a power cut). A write or a truncation changes only the
//!   live contents; `fsync` or `fdatasync` of the file copies them to the
//!   durable ones.
//! - Every directory has live and durable entries. Creating, removing and
//!   renaming files and directories changes only the live entries; `fsync`
//!   of the directory copies them to the durable ones. A new file whose data
//!   was synced but whose directory was not is gone after a cut, as POSIX
//!   allows: this is what makes a new store's directory `fsync` matter.
//! - [`PowerCutFs::freeze`] is the moment of the cut: from then on every
//!   request fails with `EIO` and changes nothing, so a process that is
//!   still running (until its `SIGKILL` lands) cannot make anything durable.
//!   [`PowerCutFs::freeze_after`] freezes after a given number of further
//!   changes, for cuts at exact points of a sequence of writes.
//! - [`PowerCutFs::power_cut`] freezes, unmounts, throws the live state away
//!   (live := durable; whatever no durable directory entry reaches is gone)
//!   and mounts the durable state again.
//!
//! The kernel keeps nothing across a cut: files are opened with
//! `FOPEN_DIRECT_IO`, so there is no page cache (and `sync_file_range`,
//! which only writes back cached pages, cannot stand in for `fdatasync`),
//! the writeback cache stays off (fuser does not ask for it), and every cut
//! is a new mount.
//!
//! Dropping everything unsynced is the harshest outcome of a power cut, not
//! every possible one: a real disk may also keep some unsynced writes, or
//! tear one. Hard links, symbolic links, extended attributes and POSIX locks
//! are not served (`flock` works: the kernel handles it).
//!
//! The mount needs `/dev/fuse` and, for the direct `mount(2)` fuser tries
//! first, root; otherwise fuser falls back to `fusermount3` (package `fuse3`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};

const BLOCK: usize = 4096;
/// How long the kernel may cache names and attributes. Only this mount's
/// kernel changes the files, so its caches stay right; a cut is a new mount.
const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;

/// A file's contents in shared blocks: a sync copies the list, not the
/// bytes, and a write copies only the blocks it changes.
#[derive(Clone, Default)]
struct Data {
    len: u64,
    /// `len.div_ceil(BLOCK)` blocks; the bytes past `len` are zero.
    blocks: Vec<Arc<[u8; BLOCK]>>,
}

impl Data {
    fn set_len(&mut self, len: u64) {
        let blocks = len.div_ceil(BLOCK as u64) as usize;
        if len < self.len {
            self.blocks.truncate(blocks);
            let tail = (len % BLOCK as u64) as usize;
            if let (true, Some(last)) = (tail != 0, self.blocks.last_mut()) {
                Arc::make_mut(last)[tail..].fill(0);
            }
        } else {
            self.blocks.resize_with(blocks, || Arc::new([0; BLOCK]));
        }
        self.len = len;
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        if end > self.len {
            self.set_len(end);
        }
        let mut done = 0;
        while done < bytes.len() {
            let at = offset + done as u64;
            let (index, within) = ((at / BLOCK as u64) as usize, (at % BLOCK as u64) as usize);
            let n = (BLOCK - within).min(bytes.len() - done);
            Arc::make_mut(&mut self.blocks[index])[within..within + n]
                .copy_from_slice(&bytes[done..done + n]);
            done += n;
        }
    }

    fn read(&self, offset: u64, size: u32) -> Vec<u8> {
        let end = offset.saturating_add(u64::from(size)).min(self.len);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let (index, within) = ((at / BLOCK as u64) as usize, (at % BLOCK as u64) as usize);
            let n = ((BLOCK - within) as u64).min(end - at) as usize;
            out.extend_from_slice(&self.blocks[index][within..within + n]);
            at += n as u64;
        }
        out
    }
}

type Entries = BTreeMap<OsString, u64>;

enum Node {
    File { live: Data, durable: Data },
    Dir { live: Entries, durable: Entries },
}

impl Node {
    fn kind(&self) -> FileType {
        match self {
            Node::File { .. } => FileType::RegularFile,
            Node::Dir { .. } => FileType::Directory,
        }
    }
}

/// What the file system was asked to do since it was mounted first.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// `fsync` of a file.
    pub fsync: u64,
    /// `fdatasync` of a file.
    pub fdatasync: u64,
    /// `fsync` of a directory.
    pub fsyncdir: u64,
    /// Changes applied: writes, truncations, namespace changes, syncs.
    pub changes: u64,
    /// Requests refused with `EIO` because the file system was frozen.
    pub refused: u64,
    /// Power cuts.
    pub cuts: u64,
}

impl Counts {
    /// `fsync` and `fdatasync` of files.
    pub fn file_syncs(&self) -> u64 {
        self.fsync + self.fdatasync
    }
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    frozen: bool,
    /// Freeze once this many more changes have been applied.
    freeze_after: Option<u64>,
    counts: Counts,
}

impl State {
    fn new() -> State {
        let root = Node::Dir {
            live: Entries::new(),
            durable: Entries::new(),
        };
        State {
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            frozen: false,
            freeze_after: None,
            counts: Counts::default(),
        }
    }

    /// Counts a change, and freezes when the armed count runs out.
    fn changed(&mut self) {
        self.counts.changes += 1;
        if let Some(left) = self.freeze_after.as_mut() {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.freeze_after = None;
                self.frozen = true;
            }
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn entries(&self, dir: u64) -> Result<&Entries, Errno> {
        match self.node(dir)? {
            Node::Dir { live, .. } => Ok(live),
            Node::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut Entries, Errno> {
        match self.node_mut(dir)? {
            Node::Dir { live, .. } => Ok(live),
            Node::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut Data, Errno> {
        match self.node_mut(ino)? {
            Node::File { live, .. } => Ok(live),
            Node::Dir { .. } => Err(Errno::EISDIR),
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(parent)?
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn is_dir(&self, ino: u64) -> bool {
        self.nodes
            .get(&ino)
            .is_some_and(|node| node.kind() == FileType::Directory)
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let (kind, size, perm, nlink) = match self.node(ino)? {
            Node::File { live, .. } => (FileType::RegularFile, live.len, 0o644, 1),
            Node::Dir { .. } => (FileType::Directory, 0, 0o755, 2),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        })
    }

    /// Adds a node under `parent` (a live entry only, until the directory
    /// is synced).
    fn add(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<FileAttr, Errno> {
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        self.changed();
        self.attr(ino)
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let ino = self.lookup(parent, name)?;
        match self.lookup(new_parent, new_name) {
            Ok(_) if flags.contains(RenameFlags::RENAME_NOREPLACE) => return Err(Errno::EEXIST),
            Ok(target) if target == ino => return Ok(()),
            Ok(target) => match (self.is_dir(ino), self.is_dir(target)) {
                (true, true) if !self.entries(target)?.is_empty() => return Err(Errno::ENOTEMPTY),
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                _ => {}
            },
            Err(error) if error != Errno::ENOENT => return Err(error),
            Err(_) => {}
        }
        self.entries_mut(parent)?.remove(name);
        self.entries_mut(new_parent)?
            .insert(new_name.to_owned(), ino);
        self.changed();
        Ok(())
    }

    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        match (dir, self.is_dir(ino)) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if !self.entries(ino)?.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(parent)?.remove(name);
        self.changed();
        Ok(())
    }

    /// `fsync`/`fdatasync` of a file or `fsync` of a directory: the live
    /// state becomes durable.
    fn sync(&mut self, ino: u64, datasync: bool) -> Result<(), Errno> {
        match self.node_mut(ino)? {
            Node::File { live, durable } => *durable = live.clone(),
            Node::Dir { live, durable } => *durable = live.clone(),
        }
        match (self.is_dir(ino), datasync) {
            (true, _) => self.counts.fsyncdir += 1,
            (false, true) => self.counts.fdatasync += 1,
            (false, false) => self.counts.fsync += 1,
        }
        self.changed();
        Ok(())
    }

    /// The power cut: only the durable state is left.
    fn cut(&mut self) {
        let mut reachable = HashSet::from([ROOT]);
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            if let Some(Node::Dir { durable, .. }) = self.nodes.get(&ino) {
                for child in durable.values() {
                    if reachable.insert(*child) {
                        todo.push(*child);
                    }
                }
            }
        }
        self.nodes.retain(|ino, _| reachable.contains(ino));
        for node in self.nodes.values_mut() {
            match node {
                Node::File { live, durable } => *live = durable.clone(),
                Node::Dir { live, durable } => *live = durable.clone(),
            }
        }
        self.frozen = false;
        self.freeze_after = None;
        self.counts.cuts += 1;
    }
}

/// The FUSE side: every request runs under the state's lock.
struct Served(Arc<Mutex<State>>);

impl Served {
    /// Runs `op` on the state, or fails with `EIO` once frozen.
    fn serve<T>(&self, op: impl FnOnce(&mut State) -> Result<T, Errno>) -> Result<T, Errno> {
        let mut state = lock(&self.0);
        if state.frozen {
            state.counts.refused += 1;
            return Err(Errno::EIO);
        }
        op(&mut state)
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Filesystem for Served {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.serve(|s| s.attr(s.lookup(parent.0, name)?)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.serve(|s| s.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.serve(|s| {
            if let Some(size) = size {
                s.file_mut(ino.0)?.set_len(size);
                s.changed();
            }
            s.attr(ino.0)
        });
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let dir = Node::Dir {
            live: Entries::new(),
            durable: Entries::new(),
        };
        match self.serve(|s| s.add(parent.0, name, dir)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.serve(|s| match s.lookup(parent.0, name) {
            Ok(_) if flags & nix::fcntl::OFlag::O_EXCL.bits() != 0 => Err(Errno::EEXIST),
            Ok(ino) => {
                if flags & nix::fcntl::OFlag::O_TRUNC.bits() != 0 {
                    s.file_mut(ino)?.set_len(0);
                    s.changed();
                }
                s.attr(ino)
            }
            Err(error) if error != Errno::ENOENT => Err(error),
            Err(_) => {
                let file = Node::File {
                    live: Data::default(),
                    durable: Data::default(),
                };
                s.add(parent.0, name, file)
            }
        });
        match result {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.serve(|s| s.remove(parent.0, name, false)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.serve(|s| s.remove(parent.0, name, true)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.serve(|s| s.rename(parent.0, name, new_parent.0, new_name, flags)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.serve(|s| s.attr(ino.0)) {
            Ok(attr) if attr.kind == FileType::Directory => reply.error(Errno::EISDIR),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.serve(|s| Ok(s.file_mut(ino.0)?.read(offset, size))) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.serve(|s| {
            s.file_mut(ino.0)?.write(offset, data);
            s.changed();
            Ok(data.len() as u32)
        });
        match result {
            Ok(written) => reply.written(written),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.serve(|s| s.sync(ino.0, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.serve(|s| {
            let mut list = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (ROOT, FileType::Directory, OsString::from("..")),
            ];
            for (name, child) in s.entries(ino.0)? {
                let kind = if s.is_dir(*child) {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                list.push((*child, kind, name.clone()));
            }
            Ok(list)
        });
        match listed {
            Ok(list) => {
                for (index, (child, kind, name)) in list.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*child), index as u64 + 1, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    /// A directory syncs like a file (`sync` tells them apart).
    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync(req, ino, fh, datasync, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 64 GiB free, so that the store's free-space reserve never refuses a send.
        let blocks = 16 << 20;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            1 << 20,
            1 << 20,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

/// The mounted file system, on a temporary directory of its own; unmounted
/// when dropped. Every process using it must be gone (or have closed its
/// files) before [`PowerCutFs::power_cut`] or drop, or the unmount waits
/// (up to 10 s, then detaches the mount).
pub struct PowerCutFs {
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    // Last: removed after the unmount.
    dir: tempfile::TempDir,
}

impl PowerCutFs {
    /// Mounts an empty file system. `Err` says why FUSE is not available.
    pub fn mount() -> Result<PowerCutFs, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse does not exist".to_owned());
        }
        let dir = tempfile::Builder::new()
            .prefix("async-messages-powercut-")
            .tempdir()
            .map_err(|e| format!("cannot create a mount point: {e}"))?;
        let mut fs = PowerCutFs {
            state: Arc::new(Mutex::new(State::new())),
            session: None,
            dir,
        };
        fs.start()?;
        Ok(fs)
    }

    fn start(&mut self) -> Result<(), String> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut".to_owned()),
            MountOption::Subtype("powercut".to_owned()),
        ];
        let session = fuser::spawn_mount(Served(self.state.clone()), self.dir.path(), &config)
            .map_err(|e| {
                format!(
                    "cannot mount a FUSE file system on {}: {e}",
                    self.dir.path().display()
                )
            })?;
        self.session = Some(session);
        Ok(())
    }

    /// Unmounts, waiting while the mount is busy (a process that just
    /// closed the store may still hold its files for a moment).
    fn stop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let started = Instant::now();
        loop {
            match nix::mount::umount(self.dir.path()) {
                Ok(()) => break,
                Err(nix::errno::Errno::EBUSY) if started.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(nix::errno::Errno::EBUSY) => {
                    eprintln!(
                        "powercut: {} stayed busy for 10 s; detaching it",
                        self.dir.path().display()
                    );
                    let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
                    break;
                }
                // Not mounted any more (or never was): nothing to wait for.
                Err(_) => break,
            }
        }
        // The session thread ends when the kernel closes the connection.
        if let Err(error) = session.join() {
            eprintln!("powercut: the FUSE session ended with an error: {error}");
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The moment of the power cut: every later request fails with `EIO`
    /// and changes nothing, so the durable state is fixed.
    pub fn freeze(&self) {
        lock(&self.state).frozen = true;
    }

    /// Freezes once `changes` more changes (writes, truncations, namespace
    /// changes, syncs) have been applied; at once if `changes` is 0.
    pub fn freeze_after(&self, changes: u64) {
        let mut state = lock(&self.state);
        if changes == 0 {
            state.frozen = true;
        } else {
            state.freeze_after = Some(changes);
        }
    }

    /// Whether the file system is frozen (by [`PowerCutFs::freeze`] or a
    /// [`PowerCutFs::freeze_after`] that ran out).
    pub fn is_frozen(&self) -> bool {
        lock(&self.state).frozen
    }

    /// What the file system has been asked to do so far.
    pub fn counts(&self) -> Counts {
        lock(&self.state).counts
    }

    /// Cuts the power: freezes (if not yet frozen), unmounts, keeps only
    /// what was synced and mounts that again. Processes that used the
    /// file system must be gone; this process must have closed its files.
    pub fn power_cut(&mut self) {
        self.freeze();
        self.stop();
        lock(&self.state).cut();
        if let Err(error) = self.start() {
            panic!("powercut: cannot mount again after the cut: {error}");
        }
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        self.stop();
    }
}
