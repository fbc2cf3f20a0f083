//! A caller speaking h2c frame by frame, for what a library client would
//! not send (or not send on its own).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/2 frame: type, flags, stream and payload.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A GET request's header block in HPACK, literals only.
pub fn h2_get(path: &str) -> Vec<u8> {
    // :method GET and :scheme http from the static table; :path and
    // :authority as literals without indexing, names from the static table.
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 1, b'x']);
    block
}

/// A frame received: type, flags, stream, payload.
#[derive(Debug, Clone)]
pub struct H2Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// What waiting for the next frame gave.
#[derive(Debug)]
pub enum H2Read {
    Frame(H2Frame),
    /// Nothing within the time given.
    Quiet,
    /// The server closed the connection.
    Closed,
}

/// An h2c client spoken frame by frame, for what a library client would
/// not send (or not send on its own).
pub struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawH2 {
    /// Connects and sends the preface and a SETTINGS frame of `settings`
    /// (identifier, value).
    pub async fn connect(addr: SocketAddr, settings: &[(u16, u32)]) -> RawH2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let payload: Vec<u8> = settings
            .iter()
            .flat_map(|(id, v)| [id.to_be_bytes().as_slice(), &v.to_be_bytes()].concat())
            .collect();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(h2_frame(0x4, 0, 0, &payload));
        stream.write_all(&hello).await.unwrap();
        RawH2 {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends `frame`; false once the server has closed the connection.
    pub async fn send(&mut self, frame: &[u8]) -> bool {
        self.stream.write_all(frame).await.is_ok()
    }

    /// The next frame, if one comes within `within`.
    pub async fn next(&mut self, within: Duration) -> H2Read {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.buf.len() >= 9 {
                let b = &self.buf;
                let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
                if b.len() >= 9 + len {
                    let frame = H2Frame {
                        kind: b[3],
                        flags: b[4],
                        stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
                        payload: b[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return H2Read::Frame(frame);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return H2Read::Quiet,
                Ok(Ok(0)) | Ok(Err(_)) => return H2Read::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}
