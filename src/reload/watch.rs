//! Reloads when the config file or a file it references changes. The directories holding them
//! are watched, not the files: Kubernetes replaces a mounted ConfigMap or Secret by swapping a
//! `..data` symlink, and editors and `mv` replace a file by rename — both leave a watch on the
//! old inode blind. Events are debounced, and a reload happens only when the bytes of the
//! watched files actually changed.

use std::collections::BTreeSet;
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

/// Watches the running config's files until `shutdown` turns true.
pub async fn run(reloader: Arc<Reloader>, mut shutdown: watch::Receiver<bool>) {
    let (events, mut changed) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| may_change_content(&event.kind)) {
            let _ = events.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch the config files; reload with SIGHUP or POST /config/reload");
            return;
        }
    };
    let mut files = reloader.files().await;
    let mut watched = watch_directories(&mut watcher, &files, &BTreeSet::new());
    let mut seen = fingerprint(&files);
    loop {
        tokio::select! {
            event = changed.recv() => if event.is_none() { return },
            _ = shutdown.changed() => return,
        }
        // Let a burst of events (a rename, a symlink swap, an editor's save) settle.
        tokio::time::sleep(DEBOUNCE).await;
        while changed.try_recv().is_ok() {}
        let now = fingerprint(&files);
        if now == seen {
            continue;
        }
        seen = now;
        tracing::info!("a watched config file changed; reloading");
        if reloader.reload().await.is_ok() {
            files = reloader.files().await;
            watched = watch_directories(&mut watcher, &files, &watched);
            seen = fingerprint(&files);
        }
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

/// Watches the directories of `files` not watched yet; returns every directory watched.
fn watch_directories(
    watcher: &mut RecommendedWatcher,
    files: &[PathBuf],
    already: &BTreeSet<PathBuf>,
) -> BTreeSet<PathBuf> {
    let mut watched = already.clone();
    for directory in files.iter().map(|file| directory_of(file)) {
        if watched.contains(&directory) {
            continue;
        }
        match watcher.watch(&directory, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watched.insert(directory);
            }
            Err(err) => {
                tracing::warn!(directory = %directory.display(), error = %err, "cannot watch this directory for config changes")
            }
        }
    }
    watched
}

fn directory_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
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
}
