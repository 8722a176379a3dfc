//! Test-owned cgroup v2 directories, removed on drop.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{sanitize, unique_suffix};

/// Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup on unified
/// systems, /sys/fs/cgroup/unified on hybrid ones. Read from /proc/mounts.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    find_cgroup2(&mounts).context("no cgroup2 filesystem in /proc/mounts")
}

fn find_cgroup2(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target))
    })
}

/// A child cgroup of the cgroup2 root, named `hw<suffix>-<name>` so runs
/// never share one. Attach programs here, never to the root: only the
/// processes a test puts in it are affected.
///
/// Dropping it moves any processes still inside to the parent, then
/// removes it (and any sub-cgroups someone created in it).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Result<Self> {
        let dir = format!("hw{}-{}", unique_suffix(), sanitize(name, 32));
        let path = cgroup2_mount()?.join(dir);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves a process (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", self.path.display()))
    }

    /// Pids currently in this cgroup (not in its sub-cgroups).
    pub fn pids(&self) -> Result<Vec<u32>> {
        read_pids(&self.path).with_context(|| format!("reading {}", self.path.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            eprintln!(
                "headway-testbed: removing cgroup {}: {e}",
                self.path.display()
            );
        }
    }
}

fn read_pids(dir: &Path) -> io::Result<Vec<u32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Empties and removes a cgroup, deepest first. rmdir fails with EBUSY
/// while a dying process is still accounted to it, hence the retries.
fn remove_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    let mut last_err = None;
    for _ in 0..100 {
        evacuate(dir)?;
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last_err = Some(e),
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("rmdir kept failing")))
}

/// Moves every process of `dir` to the parent cgroup. Moving (rather than
/// killing) is safe even if the test put its own process in here.
fn evacuate(dir: &Path) -> io::Result<()> {
    let parent_procs = dir.parent().unwrap_or(dir).join("cgroup.procs");
    for pid in read_pids(dir)? {
        // ESRCH: it exited meanwhile, which is just as good.
        match fs::write(&parent_procs, pid.to_string()) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_systems() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(find_cgroup2(hybrid), Some("/sys/fs/cgroup/unified".into()));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(find_cgroup2(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(find_cgroup2("proc /proc proc rw 0 0\n"), None);
    }
}
