//! A fresh data directory is initialised for a trust-authenticated
//! superuser `postgres`, in UTF-8 and the C locale, and a failed `initdb`
//! reports what it printed and which user it ran as.

use std::process::Command;
use std::time::Instant;

use super::error::{EmbeddedError, io_err};
use super::{EmbeddedPostgres, SUPERUSER};

impl EmbeddedPostgres {
    /// Runs `initdb` into the data directory.
    pub(super) fn initdb(&self) -> Result<(), EmbeddedError> {
        let mut cmd = Command::new(self.bin_dir.join("initdb"));
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ]);
        self.prepare(&mut cmd);
        let started = Instant::now();
        let out = cmd.output().map_err(io_err(format!(
            "running {}",
            self.bin_dir.join("initdb").display()
        )))?;
        tracing::debug!(elapsed = ?started.elapsed(), "initdb done");
        if out.status.success() {
            return Ok(());
        }
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(EmbeddedError::Initdb {
            status: out.status.to_string(),
            data_dir: self.data_dir.clone(),
            user: self.user_name(),
            output,
        })
    }
}
