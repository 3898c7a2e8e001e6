//! A network outage between the suite and a platform: a TCP proxy in front of the
//! platform (an emulator, Synapse) that relays connections while up, and while down
//! cuts every open connection and closes each new one at once — to the client, the
//! platform is unreachable (its requests fail, its streams end), as when a platform
//! or the network to it goes away. Other clients reaching the platform directly (the
//! tests' people) are not affected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Outage {
    /// Where clients connect instead of the platform.
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Drop for Outage {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

impl Outage {
    /// A proxy to `target`, up.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Outage> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let down = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (d, c) = (down.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    drop(client); // unreachable: closed at once
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                let mut conns = c.lock().unwrap();
                conns.retain(|h| !h.is_finished());
                conns.push(relay);
            }
        });
        Ok(Outage {
            addr,
            down,
            conns,
            task,
        })
    }

    /// `http://<addr>`: the platform's URL through the proxy.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Down (every connection cut, new ones closed) or up again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}
