//! PostgreSQL refuses to run as root, so when we are root every server
//! program runs as `postgres` (or else `nobody`), and the data directory is
//! handed to that user before `initdb` writes to it.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;

use super::EmbeddedPostgres;
use super::error::{EmbeddedError, io_err};

/// The unprivileged user the server runs as when we are root.
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    pub(crate) name: String,
    pub(crate) uid: libc::uid_t,
    pub(crate) gid: libc::gid_t,
}

/// The user to run the server as: `None` unless we are root.
pub(crate) fn run_as() -> Result<Option<RunAs>, EmbeddedError> {
    if unsafe { libc::geteuid() } == 0 {
        Ok(Some(unprivileged_user()?))
    } else {
        Ok(None)
    }
}

impl EmbeddedPostgres {
    /// A description of the user the server runs as.
    pub(super) fn user_name(&self) -> String {
        match &self.run_as {
            Some(u) => u.name.clone(),
            None => format!("uid {}", unsafe { libc::geteuid() }),
        }
    }

    /// Hands the (empty) data directory to the server's user, mode 0700.
    pub(super) fn prepare_data_dir(&self) -> Result<(), EmbeddedError> {
        if let Some(user) = &self.run_as {
            let path = CString::new(self.data_dir.as_os_str().as_bytes()).map_err(|_| {
                EmbeddedError::Io {
                    action: format!("using data directory {}", self.data_dir.display()),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"),
                }
            })?;
            if unsafe { libc::chown(path.as_ptr(), user.uid, user.gid) } != 0 {
                return Err(EmbeddedError::Io {
                    action: format!("handing {} to user {}", self.data_dir.display(), user.name),
                    source: io::Error::last_os_error(),
                });
            }
        }
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700)).map_err(io_err(
            format!("setting permissions of {}", self.data_dir.display()),
        ))
    }
}

/// The user to run the server as when we are root.
fn unprivileged_user() -> Result<RunAs, EmbeddedError> {
    ["postgres", "nobody"]
        .into_iter()
        .find_map(lookup_user)
        .ok_or(EmbeddedError::NoUnprivilegedUser)
}

/// Looks a user up in the password database.
fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    // SAFETY: getpwnam_r writes into `pwd` and `buf`, which outlive the call;
    // only the numeric fields are read afterwards.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 64 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return None;
        }
        Some(RunAs {
            name: name.to_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}
