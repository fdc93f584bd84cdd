//! Every server program (`initdb`, `postgres`, `pg_isready`) runs unsteered
//! by the caller's environment: no `PG*` variable redirects it, and the
//! server's own run as its user, in the data directory, in the C locale.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::EmbeddedPostgres;

/// Environment variables that would redirect the server or the readiness probe.
const PG_ENV: &[&str] = &[
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSYSCONFDIR",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSSLMODE",
    "PGCONNECT_TIMEOUT",
    "PGAPPNAME",
    "PGTZ",
    "PGDATESTYLE",
];

/// Removes the [`PG_ENV`] variables from `cmd`'s environment.
pub(super) fn clear_pg_env(cmd: &mut Command) {
    for var in PG_ENV {
        cmd.env_remove(var);
    }
}

impl EmbeddedPostgres {
    /// Applies what every child needs: user, working directory, environment.
    pub(super) fn prepare(&self, cmd: &mut Command) {
        if let Some(user) = &self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.current_dir(&self.data_dir);
        clear_pg_env(cmd);
        cmd.env("LC_ALL", "C").env("LANG", "C");
        cmd.stdin(Stdio::null());
    }
}
