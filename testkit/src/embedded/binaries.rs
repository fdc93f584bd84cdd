//! The server binaries come from the first place that holds both `initdb`
//! and `postgres`, in the order the module docs give, and from their real
//! directory, since PostgreSQL finds its share directory relative to it.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::EmbeddedError;

/// Whether `path` is an executable file (following symlinks).
pub(super) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `dir` holds `initdb` and `postgres`.
fn has_server_bins(dir: &Path) -> bool {
    is_executable(&dir.join("postgres")) && is_executable(&dir.join("initdb"))
}

/// The real directory of the binaries in `dir`: PostgreSQL finds its share
/// directory relative to its real path, so symlinks are resolved.
fn real_bin_dir(dir: &Path) -> PathBuf {
    if let Some(real) = fs::canonicalize(dir.join("postgres"))
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| has_server_bins(d))
    {
        return real;
    }
    fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// Finds the directory with the server binaries (see the module docs).
pub(super) fn find_bin_dir() -> Result<PathBuf, EmbeddedError> {
    if let Some(dir) = std::env::var_os("SESSION_LOCK_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_server_bins(&dir) {
            Ok(real_bin_dir(&dir))
        } else {
            Err(EmbeddedError::BadBinDir { dir })
        };
    }

    let mut searched = Vec::new();
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        if out.status.success() {
            let dir = PathBuf::from(OsStr::from_bytes(out.stdout.trim_ascii()));
            if has_server_bins(&dir) {
                return Ok(real_bin_dir(&dir));
            }
            searched.push(format!("pg_config --bindir ({})", dir.display()));
        }
    }

    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server_bins(&dir) {
                return Ok(real_bin_dir(&dir));
            }
        }
        searched.push("PATH".into());
    }

    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.into_iter().rev().find(|(_, d)| has_server_bins(d)) {
        return Ok(real_bin_dir(&dir));
    }
    searched.push(format!("{}/*/bin", root.display()));

    Err(EmbeddedError::BinariesNotFound {
        searched: searched.join(", "),
    })
}
