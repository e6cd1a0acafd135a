//! Output files that cannot lie: created fresh without following symlinks,
//! and metadata replaced atomically (temporary file, rename; with fsyncs of
//! the file and the directory unless [`Durability::None`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::CliError;

/// What a command makes durable (fsyncs) before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Nothing, like `cp`: the output is in the page cache when the command
    /// returns; a crash may lose it. Metadata files are still replaced
    /// atomically (rename), so a reader sees the old file or the new one.
    /// `qmig extract`'s default.
    None,
    /// The metadata files (manifest.json, vmdesc.json) and their directory,
    /// not the images: the default of the other commands.
    Metadata,
    /// Everything written: images, device state and metadata (`extract --sync`).
    All,
}

static DURABILITY: AtomicU8 = AtomicU8::new(1);

/// Sets what this process fsyncs (see [`Durability`]).
pub fn set_durability(d: Durability) {
    DURABILITY.store(d as u8, Ordering::Relaxed);
}

/// What this process fsyncs (default [`Durability::Metadata`]).
pub fn durability() -> Durability {
    match DURABILITY.load(Ordering::Relaxed) {
        0 => Durability::None,
        2 => Durability::All,
        _ => Durability::Metadata,
    }
}

/// Creates `path` as a new regular file: whatever is there (a stale file, or
/// a symlink planted in the output directory) is unlinked first, and the
/// open uses `O_CREAT | O_EXCL | O_NOFOLLOW`, so no existing file or link
/// target is ever written through.
pub fn create_fresh(path: &Path) -> Result<File, CliError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(CliError::io(
                path,
                "create",
                io::Error::new(io::ErrorKind::AlreadyExists, "is a directory"),
            ))
        }
        Ok(_) => fs::remove_file(path).map_err(|e| CliError::io(path, "remove", e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(CliError::io(path, "stat", e)),
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| CliError::io(path, "create", e))
}

/// Removes `path` if it is there (a file or a symlink, never a directory).
pub fn remove_if_present(path: &Path) -> Result<(), CliError> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.is_dir() => fs::remove_file(path).map_err(|e| CliError::io(path, "remove", e)),
        _ => Ok(()),
    }
}

/// fsyncs directory `dir`, so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), CliError> {
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| CliError::io(dir, "open directory", e))?;
    d.sync_all().map_err(|e| CliError::io(dir, "fsync", e))
}

/// Replaces `dir/name` with `bytes` atomically: readers see the old file or
/// the new one, never a partial one. On failure the temporary file is
/// removed and the old file (if any) is left as it was. The file and the
/// directory are fsynced unless [`durability`] is [`Durability::None`].
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CliError> {
    let tmp: PathBuf = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    let sync = durability() != Durability::None;
    let r = (|| {
        let mut f = create_fresh(&tmp)?;
        f.write_all(bytes)
            .map_err(|e| CliError::io(&tmp, "write", e))?;
        if sync {
            f.sync_all().map_err(|e| CliError::io(&tmp, "fsync", e))?;
        }
        drop(f);
        fs::rename(&tmp, &target).map_err(|e| CliError::io(&target, "rename into place", e))?;
        if sync {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// Makes sure `dir` can be an output directory: created if missing, and a
/// clear usage error when it names something that is not a directory.
pub fn output_dir(dir: &Path) -> Result<(), CliError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(CliError::Usage(format!(
            "-o {}: exists and is not a directory (the output is a directory of images and manifest.json)",
            dir.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| CliError::io(dir, "create directory", e))
        }
        Err(e) => Err(CliError::io(dir, "stat", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch directory, removed with its contents when the returned
    /// `TempDir` drops (also when the test panics).
    fn tmp(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("qmig-files-{}-", tag.replace('/', "_")))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn create_fresh_does_not_follow_a_planted_symlink() {
        let d_tmp = tmp("link");
        let d = d_tmp.path();
        let victim = d.join("victim");
        fs::write(&victim, b"keep me").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("pc.ram.img")).unwrap();
        let mut f = create_fresh(&d.join("pc.ram.img")).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        assert!(!fs::symlink_metadata(d.join("pc.ram.img"))
            .unwrap()
            .file_type()
            .is_symlink());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let d_tmp = tmp("atomic");
        let d = d_tmp.path();
        write_atomic(d, "m.json", b"one").unwrap();
        write_atomic(d, "m.json", b"two").unwrap();
        assert_eq!(fs::read(d.join("m.json")).unwrap(), b"two");
        assert!(!d.join(".m.json.tmp").exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn output_dir_refuses_a_file() {
        let d_tmp = tmp("outdir");
        let d = d_tmp.path();
        let f = d.join("file");
        fs::write(&f, b"x").unwrap();
        let e = output_dir(&f).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("not a directory"), "{e}");
        fs::remove_dir_all(d).unwrap();
    }
}
