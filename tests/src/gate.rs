//! A TCP gate in front of a service: open, it forwards; closed, it cuts every connection it
//! carries and refuses new ones at once, as a database that went down would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// See the module docs.
pub struct Gate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    carried: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Gate {
    /// A gate on a free local port in front of `target`, open.
    pub async fn start(target: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let addr = listener.local_addr().expect("gate address");
        let open = Arc::new(AtomicBool::new(true));
        let carried: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = {
            let (open, carried) = (open.clone(), carried.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    if let Ok(mut carried) = carried.lock() {
                        carried.push(task.abort_handle());
                    }
                }
            })
            .abort_handle()
        };
        Gate {
            addr,
            open,
            carried,
            accept,
        }
    }

    /// `url` (a `postgres://` or `amqp://` URL on 127.0.0.1) going through the gate instead.
    pub fn url(&self, url: &str, target_port: u16) -> String {
        url.replacen(
            &format!("127.0.0.1:{target_port}"),
            &self.addr.to_string(),
            1,
        )
    }

    /// Cuts every carried connection and refuses new ones.
    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        if let Ok(mut carried) = self.carried.lock() {
            for task in carried.drain(..) {
                task.abort();
            }
        }
    }

    /// Forwards again.
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.accept.abort();
        self.close();
    }
}
