//! Reloads when the config file or a file it references changes. The directories holding them
//! are watched, not the files: Kubernetes replaces a mounted ConfigMap or Secret by swapping a
//! `..data` symlink, and editors and `mv` replace a file by rename — both leave a watch on the
//! old inode blind. Events are debounced, and a reload happens only when the bytes of the
//! watched files actually changed.
//!
//! - Only events about the files the config names (or Kubernetes' `..`-named entries beside
//!   them, or a watched directory itself) count: a log file in the same directory is not a
//!   change, whatever it writes.
//! - A directory that is removed and made again (a volume remounted) would leave its watch
//!   blind: every few seconds each watched directory is checked to be the one watched, and a
//!   lost watch is logged and made again. The files to watch are also read again after every
//!   reload, however it was triggered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::Reloader;

/// Events closer together than this make one reload.
const DEBOUNCE: Duration = Duration::from_millis(250);
/// How often the watched directories are checked to still be the ones watched.
const RECHECK: Duration = Duration::from_secs(2);

/// The files a reload reads, and the directories watched for them.
struct Watched {
    files: Vec<PathBuf>,
    /// Directory → its watch.
    directories: BTreeMap<PathBuf, DirectoryWatch>,
    /// The files' bytes when last loaded.
    seen: [u8; 32],
    /// The reloader's count of reloads when `files` was read.
    reloads: u64,
}

/// Where one directory's watch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirectoryWatch {
    /// Not watched yet.
    Pending,
    /// It was not there (a volume being remounted): watched once it is.
    Missing,
    /// Watched, as this directory.
    Watching(DirectoryId),
}

/// Which directory a path named when it was watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirectoryId {
    device: u64,
    inode: u64,
}

/// Watches the running config's files until `shutdown` turns true.
pub async fn run(reloader: Arc<Reloader>, mut shutdown: watch::Receiver<bool>) {
    let (events, mut changed) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if may_change_content(&event.kind) {
                let _ = events.send(event.paths);
            }
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch the config files; reload with SIGHUP or POST /config/reload");
            return;
        }
    };
    let mut watched = Watched::new(&reloader).await;
    watched.watch(&mut watcher);
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = changed.recv() => match event {
                Some(paths) if watched.concerns(&paths) => {}
                Some(_) => continue,
                None => return,
            },
            _ = recheck.tick() => watched.recheck(&mut watcher),
            _ = shutdown.changed() => return,
        }
        if watched.reloads != reloader.reloads() {
            // Reloaded meanwhile (a signal, the admin listener): follow what it loaded.
            watched = Watched::new(&reloader).await;
            watched.watch(&mut watcher);
        }
        // Let a burst of events (a rename, a symlink swap, an editor's save) settle.
        tokio::time::sleep(DEBOUNCE).await;
        while changed.try_recv().is_ok() {}
        if fingerprint(&watched.files) == watched.seen {
            continue;
        }
        tracing::info!("a watched config file changed; reloading");
        let reloaded = reloader.reload().await.is_ok();
        if reloaded {
            watched = Watched::new(&reloader).await;
        } else {
            watched.seen = fingerprint(&watched.files); // not again until they change again
        }
        watched.watch(&mut watcher);
    }
}

impl Watched {
    async fn new(reloader: &Reloader) -> Self {
        let reloads = reloader.reloads();
        let files = reloader.files().await;
        Self {
            seen: fingerprint(&files),
            directories: files
                .iter()
                .map(|file| (directory_of(file), DirectoryWatch::Pending))
                .collect(),
            files,
            reloads,
        }
    }

    /// Watches every directory not watched yet (a watch made twice is one watch).
    fn watch(&mut self, watcher: &mut RecommendedWatcher) {
        for (directory, state) in &mut self.directories {
            if matches!(state, DirectoryWatch::Watching(_)) {
                continue;
            }
            let Some(current) = directory_id(directory) else {
                if *state == DirectoryWatch::Pending {
                    tracing::warn!(directory = %directory.display(), "a config directory to watch is missing; watching it once it is back");
                    *state = DirectoryWatch::Missing;
                }
                continue;
            };
            match watcher.watch(directory, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    if *state == DirectoryWatch::Missing {
                        tracing::info!(directory = %directory.display(), "the config directory is back; watching it again");
                    }
                    *state = DirectoryWatch::Watching(current);
                }
                Err(err) => {
                    tracing::warn!(directory = %directory.display(), error = %err, "cannot watch this directory for config changes")
                }
            }
        }
    }

    /// Makes again every watch whose directory was removed or replaced since it was made.
    fn recheck(&mut self, watcher: &mut RecommendedWatcher) {
        for (directory, state) in &mut self.directories {
            let DirectoryWatch::Watching(was) = *state else {
                continue;
            };
            if directory_id(directory) == Some(was) {
                continue;
            }
            tracing::warn!(directory = %directory.display(), "a watched config directory was removed or replaced; watching it again");
            let _ = watcher.unwatch(directory);
            *state = DirectoryWatch::Pending;
        }
        self.watch(watcher);
    }

    /// Whether an event about `paths` can be a change of what the config reads.
    fn concerns(&self, paths: &[PathBuf]) -> bool {
        paths.iter().any(|path| {
            self.files.contains(path)
                || self.directories.contains_key(path)
                || path
                    .file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with(".."))
        })
    }
}

/// Whether an event can mean changed bytes. Opening and reading are not: the fingerprint's own
/// reads raise them, and reacting to those re-read and re-hashed the config every debounce
/// period for as long as the sidecar ran (7% of a core with a 20 MB config).
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn directory_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(unix)]
fn directory_id(directory: &Path) -> Option<DirectoryId> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(directory).ok()?;
    Some(DirectoryId {
        device: metadata.dev(),
        inode: metadata.ino(),
    })
}

#[cfg(not(unix))]
fn directory_id(directory: &Path) -> Option<DirectoryId> {
    directory.is_dir().then_some(DirectoryId { device: 0, inode: 0 })
}

/// The SHA-256 of every file's bytes, as they read now (through symlinks); unreadable files
/// count as empty.
fn fingerprint(files: &[PathBuf]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for file in files {
        let bytes = std::fs::read(file).unwrap_or_default();
        hasher.update(Sha256::digest(&bytes));
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};

    use super::*;

    #[test]
    fn reading_the_files_is_not_a_change_but_writing_renaming_and_removing_are() {
        let reads = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ];
        assert!(reads.iter().all(|kind| !may_change_content(kind)));
        let changes = [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ];
        assert!(changes.iter().all(may_change_content));
    }

    #[test]
    fn only_events_about_the_configs_files_count() {
        let watched = Watched {
            files: vec![PathBuf::from("/etc/ts/sidecar.toml"), PathBuf::from("/run/s/key")],
            directories: [PathBuf::from("/etc/ts"), PathBuf::from("/run/s")]
                .into_iter()
                .map(|d| (d, DirectoryWatch::Pending))
                .collect(),
            seen: [0; 32],
            reloads: 0,
        };
        let concerns = |path: &str| watched.concerns(&[PathBuf::from(path)]);
        assert!(concerns("/etc/ts/sidecar.toml"));
        assert!(concerns("/run/s/..data"), "a Kubernetes symlink swap");
        assert!(concerns("/run/s/..2026_12_06_20_00_00.123"));
        assert!(concerns("/etc/ts"), "the directory itself went");
        assert!(!concerns("/etc/ts/sidecar.log"), "a log file beside the config");
        assert!(
            !concerns("/etc/ts/sidecar.toml.staging"),
            "an editor's staging file alone"
        );
        assert!(watched.concerns(&[
            // renamed over the config file
            PathBuf::from("/etc/ts/sidecar.toml.staging"),
            PathBuf::from("/etc/ts/sidecar.toml")
        ]));
    }
}
