//! Any bytes from a peer of the rendezvous server (before and after the handshake): the server
//! answers or drops that connection and keeps serving the gang.
#![no_main]
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::OnceLock;
use std::time::Duration;

use radfm_collective::rendezvous::{RendezvousClient, RendezvousServer};

fn server() -> &'static RendezvousServer {
    static SERVER: OnceLock<RendezvousServer> = OnceLock::new();
    SERVER.get_or_init(|| RendezvousServer::start("127.0.0.1:0", None, 1).unwrap())
}

fn send(addr: std::net::SocketAddr, bytes: &[u8]) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    while let Ok(n) = s.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let s = server();
    // As a stranger (the bytes are the handshake), and as an admitted peer (AUTH first).
    send(s.addr, data);
    let mut admitted = b"AUTH\n".to_vec();
    admitted.extend_from_slice(data);
    send(s.addr, &admitted);
    // The gang still gets its answers.
    let mut c =
        RendezvousClient::connect(&s.addr.to_string(), 1, Duration::from_secs(5), None).unwrap();
    c.set("fuzz-alive", b"yes").unwrap();
    assert_eq!(c.get("fuzz-alive").unwrap(), b"yes");
});
