//! The fault-injecting TCP proxy between one runner process and PostgreSQL.
//! What it keeps true: with the link healthy it forwards both directions
//! byte for byte and in order, and passes EOF on as a half-close once all
//! that was read before it is written; dropping a [`Proxy`] closes every
//! connection it carries.
//!
//! Two faults, set per proxy through [`Proxy::set`]:
//!
//! * latency: added to every server-to-client chunk, order kept;
//! * blackhole: nothing is forwarded and nothing is closed. By default it
//!   discards what it carries (toxiproxy's `timeout` toxic): the connections
//!   it cuts stay open, as the kernel sees them (a proxy or sidecar acks
//!   them), but never answer again, so only the library's own client-side
//!   deadlines get the victim out. `SESSION_LOCK_CHAOS_BLACKHOLE=hold`
//!   makes it hold what it carries instead: bytes wait in the socket
//!   buffers (and new connections wait unconnected), as a partitioned TCP
//!   connection's do, and flow after the heal, so that a stale request
//!   reaches the database late (the fence must refuse it).
//!
//! The proxy is our own rather than the `noxious` crate: noxious swaps the
//! two directions of every open connection each time a toxic changes
//! (`recreate_links` binds the downstream link's ends as the upstream's)
//! and drops the bytes queued in a toxic when it is removed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

/// What a proxy does to its connections right now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct LinkState {
    /// Forward nothing, close nothing: discard what arrives, or (hold mode)
    /// leave it in the socket buffers, and new connections unconnected,
    /// until the link heals.
    pub(super) blackhole: bool,
    /// Added to every server-to-client chunk (order is kept).
    pub(super) latency: Duration,
}

/// A TCP proxy from a loopback port to `upstream`. Dropping it closes every
/// connection it carries.
pub(super) struct Proxy {
    pub(super) port: u16,
    state: watch::Sender<LinkState>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub(super) async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a proxy port");
        let port = listener.local_addr().expect("proxy address").port();
        let (state, rx) = watch::channel(LinkState::default());
        let task = tokio::spawn(async move {
            // Owned here: aborting the accept loop aborts every connection.
            let mut conns = JoinSet::new();
            loop {
                match listener.accept().await {
                    Ok((client, _)) => {
                        conns.spawn(serve(client, upstream, rx.clone()));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
                while conns.try_join_next().is_some() {}
            }
        });
        Proxy { port, state, task }
    }

    pub(super) fn set(&self, f: impl FnOnce(&mut LinkState)) {
        self.state.send_modify(f);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A blackhole discards what it carries (toxiproxy's `timeout` toxic), so
/// the connections it cut stay open but never answer again; with
/// `SESSION_LOCK_CHAOS_BLACKHOLE=hold` it holds it and delivers it late.
fn drop_mode() -> bool {
    std::env::var("SESSION_LOCK_CHAOS_BLACKHOLE").map_or(true, |v| v != "hold")
}

/// Waits until the link is not blackholed (at once in drop mode).
async fn link_open(state: &mut watch::Receiver<LinkState>) {
    if !drop_mode() {
        let _ = state.wait_for(|s| !s.blackhole).await;
    }
}

/// Whether to discard a chunk: blackholed in drop mode.
fn discard(state: &watch::Receiver<LinkState>) -> bool {
    drop_mode() && state.borrow().blackhole
}

async fn serve(client: TcpStream, upstream: SocketAddr, mut state: watch::Receiver<LinkState>) {
    link_open(&mut state).await;
    // Postgres down: the client sees its connection close at once.
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, state.clone(), false),
        pump(server_read, client_write, state, true),
    );
}

/// Copies one direction, chunk by chunk, holding chunks while blackholed and
/// delaying them by the latency (downstream only); passes EOF on as a
/// half-close once everything read before it is written.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    state: watch::Receiver<LinkState>,
    downstream: bool,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let mut read_state = state.clone();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            link_open(&mut read_state).await;
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if discard(&read_state) {
                continue;
            }
            let delay = if downstream {
                read_state.borrow().latency
            } else {
                Duration::ZERO
            };
            let due = tokio::time::Instant::now() + delay;
            if tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let mut write_state = state;
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            link_open(&mut write_state).await;
            if discard(&write_state) {
                continue;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}
