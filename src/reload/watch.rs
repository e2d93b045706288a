//! Reloads when the config file or a file it references changes. The directories holding them
//! are watched, not the files: Kubernetes replaces a mounted ConfigMap or Secret by swapping a
//! `..data` symlink, and editors and `mv` replace a file by rename — both leave a watch on the
//! old inode blind. Events are debounced, and a reload happens only when the bytes of the
//! watched files actually changed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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
        if event.is_ok() {
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
