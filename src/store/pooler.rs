//! What a transaction pooler in front of the database changes, and how the
//! store finds out that there is one.
//!
//! Behind PgBouncer in transaction mode each transaction may run on another
//! server connection, so nothing may rely on session state: the store's
//! calls are single statements with unnamed prepared statements, and the
//! protocol's settings travel with its functions (`SET lock_timeout` in
//! their definitions). Two things need a session of their own: LISTEN, and
//! the migrator's advisory lock. What keeps true:
//! - A pooler is recognised by its refusal of the startup parameter
//!   `options` (PgBouncer's default `ignore_startup_parameters` lets only a
//!   few through), or declared ([`StoreOptions::pooler`](super::StoreOptions::pooler)).
//!   Its connections are then opened without `options`: the statement
//!   timeout is the client's call timeout alone (set `statement_timeout`
//!   on the role to have the server enforce one too).
//! - LISTEN goes to the direct URL when there is one; without one, behind a
//!   pooler, the runner relies on its tick and says so once.
//! - A migrator given a pooler's URL fails with an error that says why,
//!   before it takes a lock it could never release.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio_postgres::Config;
use tokio_postgres::config::Host;

/// Whether the store's URL leads to a transaction pooler, as declared or
/// found out, shared by its pools and its LISTEN connections.
#[derive(Debug, Default)]
pub(crate) struct PoolerCell {
    pooler: AtomicBool,
    told: AtomicBool,
}

impl PoolerCell {
    pub(crate) fn declared(pooler: bool) -> Self {
        PoolerCell {
            pooler: AtomicBool::new(pooler),
            told: AtomicBool::new(false),
        }
    }

    pub(crate) fn is_pooler(&self) -> bool {
        self.pooler.load(Ordering::Relaxed)
    }

    /// Records that a connect was refused for its `options`; logs it once.
    pub(crate) fn found(&self) {
        self.pooler.store(true, Ordering::Relaxed);
        if !self.told.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the server refused the startup parameter `options`: taking it for a transaction pooler (PgBouncer); \
                 connecting without it, so the statement timeout is the client's call timeout alone"
            );
        }
    }
}

/// Whether `e` is a server's refusal of the startup parameter `options`,
/// as PgBouncer's default configuration answers it.
pub(crate) fn refused_options(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.message().contains("unsupported startup parameter"))
}

/// `config` without the startup parameter `options` (tokio-postgres can
/// set it, not unset it: every other setting is copied).
pub(crate) fn without_options(c: &Config) -> Config {
    let mut b = Config::new();
    if let Some(user) = c.get_user() {
        b.user(user);
    }
    if let Some(password) = c.get_password() {
        b.password(password);
    }
    if let Some(dbname) = c.get_dbname() {
        b.dbname(dbname);
    }
    if let Some(name) = c.get_application_name() {
        b.application_name(name);
    }
    b.ssl_mode(c.get_ssl_mode())
        .ssl_negotiation(c.get_ssl_negotiation());
    for host in c.get_hosts() {
        match host {
            Host::Tcp(name) => b.host(name),
            #[cfg(unix)]
            Host::Unix(path) => b.host_path(path),
        };
    }
    for addr in c.get_hostaddrs() {
        b.hostaddr(*addr);
    }
    for port in c.get_ports() {
        b.port(*port);
    }
    if let Some(t) = c.get_connect_timeout() {
        b.connect_timeout(*t);
    }
    if let Some(t) = c.get_tcp_user_timeout() {
        b.tcp_user_timeout(*t);
    }
    b.keepalives(c.get_keepalives())
        .keepalives_idle(c.get_keepalives_idle());
    if let Some(interval) = c.get_keepalives_interval() {
        b.keepalives_interval(interval);
    }
    if let Some(retries) = c.get_keepalives_retries() {
        b.keepalives_retries(retries);
    }
    b.target_session_attrs(c.get_target_session_attrs())
        .channel_binding(c.get_channel_binding())
        .load_balance_hosts(c.get_load_balance_hosts());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_options_keeps_every_other_setting() {
        let url = "postgresql://app:secret@db1:5433,db2:5434/tasks?application_name=svc\
                   &sslmode=require&connect_timeout=7&target_session_attrs=read-write\
                   &keepalives_idle=11&load_balance_hosts=random";
        let mut with: Config = format!("{url}&options=-c%20statement_timeout%3D5000")
            .parse()
            .unwrap();
        with.tcp_user_timeout(std::time::Duration::from_secs(9))
            .keepalives_interval(std::time::Duration::from_secs(2))
            .keepalives_retries(4);
        let mut bare: Config = url.parse().unwrap();
        bare.tcp_user_timeout(std::time::Duration::from_secs(9))
            .keepalives_interval(std::time::Duration::from_secs(2))
            .keepalives_retries(4);
        assert!(with.get_options().is_some());
        assert_eq!(without_options(&with), bare);
        assert_eq!(without_options(&with).get_options(), None);
    }
}
