//! A streaming standby of an embedded server, for failover tests: its data
//! directory is a `pg_basebackup -R` of the primary, so it starts in
//! recovery, follows the primary's WAL over a replication connection, and
//! serves reads only, until [`promote`](EmbeddedPostgres::promote)d.

use std::process::Command;

use super::error::{EmbeddedError, io_err};
use super::{EmbeddedOptions, EmbeddedPostgres, HOST, SUPERUSER};

impl EmbeddedPostgres {
    /// Starts a streaming standby of `primary` (which must be running) with
    /// `opts`. Blocks until it accepts (read-only) connections. Its
    /// `primary_conninfo` names it `application_name=standby`, for
    /// `synchronous_standby_names`.
    pub fn standby_of(
        primary: &EmbeddedPostgres,
        opts: EmbeddedOptions,
    ) -> Result<Self, EmbeddedError> {
        let mut pg = Self::unstarted(opts)?;
        let mut cmd = Command::new(pg.bin_dir.join("pg_basebackup"));
        cmd.arg("-D")
            .arg(&pg.data_dir)
            .args([
                "-h", HOST, "-U", SUPERUSER, "-X", "stream", "-R", "-c", "fast", "-p",
            ])
            .arg(primary.port().to_string())
            .args(["-d", "application_name=standby"]);
        pg.run_tool("pg_basebackup", cmd)?;
        pg.start_on_a_port()?;
        tracing::debug!(
            port = pg.port,
            primary = primary.port(),
            "embedded standby ready"
        );
        Ok(pg)
    }

    /// Promotes this standby to a primary (`pg_ctl promote`, waiting until
    /// it takes writes).
    pub fn promote(&self) -> Result<(), EmbeddedError> {
        let mut cmd = Command::new(self.bin_dir.join("pg_ctl"));
        cmd.arg("promote").arg("-w").arg("-D").arg(&self.data_dir);
        self.run_tool("pg_ctl promote", cmd)
    }

    /// Runs a server tool as the server's user, reporting what it printed
    /// when it fails.
    fn run_tool(&self, tool: &str, mut cmd: Command) -> Result<(), EmbeddedError> {
        self.prepare(&mut cmd);
        let out = cmd.output().map_err(io_err(format!("running {tool}")))?;
        if out.status.success() {
            return Ok(());
        }
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(EmbeddedError::Tool {
            tool: tool.to_owned(),
            status: out.status.to_string(),
            user: self.user_name(),
            output,
        })
    }
}
