//! The lowest floor under a hyper proxy: a thread per core, each with a
//! current-thread runtime and its own `SO_REUSEPORT` listener, and every
//! caller connection paired with one upstream connection of its own, driven
//! by the same task (`hyper::client::conn::http1`: no pool, no dispatch
//! between tasks). Requests are forwarded unchanged: no signing, logging,
//! limits or timers. `bench/floor.sh` runs it next to pandagate and nginx;
//! it is a measuring stick, not a product.
//!
//!     LISTEN=127.0.0.1:8081 UPSTREAM_ADDR=127.0.0.1:8082 THREADS=2 \
//!         cargo run --release --example paired_proxy

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;

fn main() {
    let listen: SocketAddr = std::env::var("LISTEN")
        .expect("LISTEN=ip:port")
        .parse()
        .expect("LISTEN is ip:port");
    let upstream: SocketAddr = std::env::var("UPSTREAM_ADDR")
        .expect("UPSTREAM_ADDR=ip:port")
        .parse()
        .expect("UPSTREAM_ADDR is ip:port");
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let workers: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || serve(listen, upstream)))
        .collect();
    for w in workers {
        let _ = w.join();
    }
}

fn serve(listen: SocketAddr, upstream: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.set_reuseport(true).expect("SO_REUSEPORT");
        socket.bind(listen).expect("bind");
        let listener = socket.listen(1024).expect("listen");
        loop {
            let Ok((caller, _)) = listener.accept().await else {
                continue;
            };
            let _ = caller.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(provider) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = provider.set_nodelay(true);
                let Ok((sender, upstream_conn)) =
                    hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(provider))
                        .await
                else {
                    return;
                };
                let sender = std::sync::Arc::new(Mutex::new(sender));
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let sender = sender.clone();
                    async move { sender.lock().await.send_request(req).await }
                });
                let server = http1::Builder::new().serve_connection(TokioIo::new(caller), service);
                tokio::select! {
                    _ = server => {}
                    _ = upstream_conn => {}
                }
            });
        }
    });
}
