//! A tmpfs mounted for one test (needs root): a small disk to fill, or one
//! to remount read-only.

use std::path::PathBuf;
use std::process::Command;

use super::{TestDir, missing_prerequisite};

/// A tmpfs mounted for one test (needs root), unmounted when dropped.
pub struct Mount {
    pub point: PathBuf,
    _dir: TestDir,
}

impl Mount {
    /// `None` where mounting is not possible: the test then fails if `CI`
    /// is set, and is skipped with a `SKIPPED` line on stderr otherwise.
    pub fn tmpfs(size: &str) -> Option<Mount> {
        let mount = Mount::try_tmpfs(size);
        if let Err(reason) = &mount {
            missing_prerequisite(reason);
        }
        mount.ok()
    }

    pub fn try_tmpfs(size: &str) -> std::result::Result<Mount, String> {
        let dir = TestDir::new();
        let point = dir.store_path().with_file_name("mnt");
        std::fs::create_dir_all(&point)
            .map_err(|e| format!("cannot create {}: {e}", point.display()))?;
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .is_some_and(|uids| uids.split_whitespace().nth(1) == Some("0"));
        if !root {
            return Err("not running as root, so no tmpfs can be mounted for this test".to_owned());
        }
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&point)
            .output();
        match out {
            Ok(out) if out.status.success() => Ok(Mount { point, _dir: dir }),
            Ok(out) => Err(format!(
                "mount -t tmpfs failed ({}); this test needs CAP_SYS_ADMIN",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run mount: {e}")),
        }
    }

    pub fn remount(&self, mode: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.point)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {mode} failed");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.point)
            .status()
            .is_ok_and(|s| s.success())
            || Command::new("umount")
                .arg("-l")
                .arg(&self.point)
                .status()
                .is_ok_and(|s| s.success());
        if !unmounted {
            eprintln!("could not unmount {}", self.point.display());
        }
    }
}
