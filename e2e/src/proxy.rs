//! [`CutProxy`]: a TCP proxy in front of an edge whose connections a test can cut or stall at
//! will, as a network would: runners pointed at it (`RUNNER_EDGE_URL`) lose their socket and their
//! in-flight requests at once and have to reconnect ([`CutProxy::cut`]), or find their connections
//! half-open: open on both ends, carrying nothing ever again ([`CutProxy::stall`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CutProxy {
    port: u16,
    cuts: watch::Sender<u64>,
    stalls: watch::Sender<u64>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `127.0.0.1:upstream`
    /// (connecting anew each time, so it follows an edge restarted on the same port).
    pub async fn start(upstream: u16) -> anyhow::Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cuts, _) = watch::channel(0u64);
        let (stalls, _) = watch::channel(0u64);
        let connections = Arc::new(AtomicU64::new(0));
        let (tx, stall_tx, count) = (cuts.clone(), stalls.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut cut = tx.subscribe();
                let mut stall = stall_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        let _ = inbound.shutdown().await;
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        // Both halves dropped: each side sees its connection end mid-stream.
                        _ = cut.changed() => {}
                        // Both halves held open and silent until the proxy goes.
                        _ = stall.changed() => std::future::pending::<()>().await,
                    }
                });
            }
        });
        Ok(CutProxy { port, cuts, stalls, connections, task })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection open now (new ones go through).
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Makes every connection open now half-open for good: neither end hears the other again, and
    /// neither sees it close (new connections go through).
    pub fn stall(&self) {
        self.stalls.send_modify(|n| *n += 1);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
