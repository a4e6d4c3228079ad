//! Secrets are typed: tokens, API tokens and vendor secrets live in `Secret`, whose
//! `Debug` and `Display` print `[redacted]` so nothing secret reaches a log by accident,
//! and which compares in constant time. Also the file modes of what holds secrets: a new
//! data dir is 0700 and each database file 0600 (an existing one open to others is
//! narrowed, a shared directory is warned about).

use std::fmt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use subtle::ConstantTimeEq;

/// Creates the data directory (and missing parents) with mode 0700: it holds the
/// databases (keys, audit trail, sealed credentials) and may hold the master key. A
/// directory that already exists keeps its mode, with a warning if others can enter it.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    if path.exists() && !path.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "it exists and is not a directory",
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    // One made by another user (root, before the service user ran): said now, not as a
    // file inside it that seems missing.
    std::fs::read_dir(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("it exists but cannot be read: {e}")))?;
    warn_if_shared(path, "data dir");
    Ok(())
}

/// What a start would refuse of an existing data dir, creating nothing (`keybrake
/// check`): a file in its place (or a dangling link), or a directory this user cannot
/// read or write. A missing one is not judged: a start creates it, and a check run from
/// elsewhere (`/`, without the start's `--data-dir`) could only guess.
pub fn check_private_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path.is_symlink() => Ok(()),
        Err(e) => Err(e),
        Ok(m) if !m.is_dir() => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "it exists and is not a directory",
        )),
        Ok(_) => {
            std::fs::read_dir(path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("it exists but cannot be read: {e}"))
            })?;
            writable_dir(path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("it exists but cannot be written: {e}"))
            })
        }
    }
}

/// Whether this process may create files in `dir` (write and search, judged with its
/// effective ids, as an open would be).
pub fn writable_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let allowed = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if allowed == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes sure a database file exists with mode 0600 before SQLite opens it, whatever the
/// directory's mode or the process umask: SQLite creates a missing file with 0644 (less
/// the umask), and gives its `-wal` and `-shm` files the database file's mode. An existing
/// file open to others is narrowed to 0600.
pub fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                log::warn!(
                    "{} had mode {mode:03o}: narrowed to 600 (it holds keys and the trail)",
                    path.display()
                );
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Logs a warning when group or others have any access to `path` (once per path: the
/// data dir is opened by several parts of the process).
pub fn warn_if_shared(path: &Path, what: &str) {
    warn_once(path, what, mode_open_to_others(path), "go-rwx");
}

/// Logs a warning when users outside the file's owner and group have any access to
/// `path`: for a file a service reads through a group of its own (TLS keys,
/// `root:keybrake-tls` 0640, which the units join), where group read is the intent.
pub fn warn_if_world_readable(path: &Path, what: &str) {
    let mode = std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777);
    warn_once(path, what, mode.filter(|m| m & 0o007 != 0), "o-rwx");
}

fn warn_once(path: &Path, what: &str, open: Option<u32>, fix: &str) {
    static WARNED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    if let Some(mode) = open {
        let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
        if !warned.iter().any(|p| p == path) {
            warned.push(path.to_path_buf());
            log::warn!(
                "{what} {} has mode {mode:03o}: open to other users; chmod {fix}",
                path.display()
            );
        }
    }
}

/// Shared text: the proxy clones a vendor secret into every request's context, which
/// is then a reference count, not a copy.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(std::sync::Arc<str>);

impl Secret {
    pub fn new(value: impl Into<std::sync::Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The secret's text, for the one place that must send it (the upstream request,
    /// the response that hands a fresh token to its owner).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison: timing does not reveal how many leading bytes match.
    pub fn ct_eq(&self, other: &str) -> bool {
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }

    /// The last four characters, the only part of a vendor secret we ever show.
    pub fn last4(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        chars[chars.len().saturating_sub(4)..].iter().collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The permission bits of `path` when group or other users may read or use it (a file
/// of secrets should be 0600): `None` when it is private or cannot be read.
pub fn mode_open_to_others(path: &Path) -> Option<u32> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_check_refuses_what_a_start_would_and_creates_nothing() {
        let root = std::env::temp_dir().join(format!("kb-check-dir-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        assert!(check_private_dir(&root.join("missing/deeper")).is_ok());
        assert!(!root.join("missing").exists(), "nothing created");
        std::fs::write(root.join("file"), b"").unwrap();
        let err = check_private_dir(&root.join("file")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling")).unwrap();
        assert!(check_private_dir(&root.join("dangling")).is_err());
        assert!(check_private_dir(&root).is_ok());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("sk_test_abcdef123456");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.last4(), "3456");
        assert!(s.ct_eq("sk_test_abcdef123456"));
        assert!(!s.ct_eq("sk_test_abcdef123457"));
    }
}
