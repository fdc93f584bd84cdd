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
//! - A pooler that lets `options` through (`ignore_startup_parameters =
//!   options`) is recognised by its cancel key: PostgreSQL gives a
//!   connection its backend's process id there, a pooler a key of its own.
//!   Only a connection whose key names its backend prepares named
//!   statements (see `PgConnection`): behind a pooler, a statement prepared
//!   on one server connection is missing on the next, or is another
//!   client's of the same name.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio_postgres::Config;
use tokio_postgres::config::Host;
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

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

    /// Records a connection whose cancel key does not name its backend: a
    /// pooler that let `options` through; logs it once.
    pub(crate) fn found_by_cancel_key(&self) {
        self.pooler.store(true, Ordering::Relaxed);
        if !self.told.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the server's cancel key does not name the backend serving the connection: taking it for a transaction pooler (PgBouncer); \
                 every call goes as an unnamed statement (declare StoreOptions::pooler to say so up front)"
            );
        }
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

/// Whether `client`'s connection is the own of the backend whose pid the
/// server reported on it (`backend`, from `pg_backend_pid()`): its cancel
/// key names that backend. `Some(false)`: a pooler's; `None` when either
/// cannot be read.
pub(crate) async fn own_backend(
    client: &tokio_postgres::Client,
    backend: Option<i32>,
) -> Option<bool> {
    let backend = backend?;
    Some(cancel_key_pid(client).await? == backend)
}

/// The process id in `client`'s cancel key (the startup's BackendKeyData):
/// from PostgreSQL, the pid of the backend serving the connection, the one
/// `pg_backend_pid()` reads; from a pooler, a number of its own. `None`
/// when it cannot be read.
///
/// tokio-postgres keeps the key to itself, and hands it only to its cancel
/// request, which it writes to any stream it is given: here an in-memory
/// pipe, with a passthrough for its TLS step, read back for the key.
async fn cancel_key_pid(client: &tokio_postgres::Client) -> Option<i32> {
    let (mut ours, theirs) = tokio::io::duplex(64);
    // The answer to an SSLRequest, should the token send one first: go
    // ahead (the passthrough below is its TLS).
    ours.write_all(b"S").await.ok()?;
    client
        .cancel_token()
        .cancel_query_raw(theirs, Passthrough)
        .await
        .ok()?;
    let mut sent = Vec::new();
    ours.read_to_end(&mut sent).await.ok()?;
    cancel_request_pid(&sent)
}

/// The CancelRequest code: 1234 in the high 16 bits, 5678 in the low.
const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// The pid of the CancelRequest that ends `sent` (length 16, the code,
/// the pid, the secret), after an SSLRequest or nothing.
fn cancel_request_pid(sent: &[u8]) -> Option<i32> {
    let request = sent.get(sent.len().checked_sub(16)?..)?;
    let word = |i: usize| {
        request
            .get(i..i + 4)?
            .try_into()
            .ok()
            .map(i32::from_be_bytes)
    };
    (word(0)? == 16 && word(4)? == CANCEL_REQUEST_CODE).then_some(word(8)?)
}

/// A "TLS" that is the stream itself: the cancel token's TLS step on the
/// in-memory pipe of `cancel_key_pid`, so that a connection made with
/// `sslmode=require` hands over its key as readably as any other.
struct Passthrough;

impl TlsConnect<DuplexStream> for Passthrough {
    type Stream = Plain;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<Plain>>;

    fn connect(self, stream: DuplexStream) -> Self::Future {
        std::future::ready(Ok(Plain(stream)))
    }
}

struct Plain(DuplexStream);

impl TlsStream for Plain {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for Plain {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Plain {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
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
    fn the_cancel_request_is_read_after_an_ssl_request_or_alone() {
        let mut cancel = Vec::new();
        for word in [16, CANCEL_REQUEST_CODE, 4242, -7] {
            cancel.extend_from_slice(&i32::to_be_bytes(word));
        }
        assert_eq!(cancel_request_pid(&cancel), Some(4242));
        let mut after_ssl = Vec::new();
        for word in [8, 80_877_103] {
            after_ssl.extend_from_slice(&i32::to_be_bytes(word));
        }
        after_ssl.extend_from_slice(&cancel);
        assert_eq!(cancel_request_pid(&after_ssl), Some(4242));
        assert_eq!(cancel_request_pid(&cancel[1..]), None, "short");
        let mut other = cancel.clone();
        other[7] ^= 1;
        assert_eq!(cancel_request_pid(&other), None, "not a cancel request");
    }

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
