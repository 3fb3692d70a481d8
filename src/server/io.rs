//! The byte streams a connection is served on: plain TCP or TLS, with the bytes already read
//! put back in front ([`Rewind`]), the protocol told apart by its first bytes, and a wait for
//! the next request that holds no buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// The HTTP/2 connection preface; a client that starts with it speaks HTTP/2 (h2c prior
/// knowledge on a plain listener).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream a client connection arrives on.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The protocol negotiated by ALPN: `Some(true)` for `h2`, `Some(false)` for `http/1.1`,
    /// `None` when none was (plain TCP, or a TLS client without ALPN).
    fn alpn_h2(&self) -> Option<bool>;

    /// Waits, holding no buffer, until the client sent something or closed; `Ok(false)` when
    /// it closed (or a plain connection was reset).
    fn wait_for_data(&mut self) -> impl Future<Output = io::Result<bool>> + Send;
}

impl ClientStream for TcpStream {
    fn alpn_h2(&self) -> Option<bool> {
        None
    }

    async fn wait_for_data(&mut self) -> io::Result<bool> {
        let mut byte = [0u8; 1];
        Ok(self.peek(&mut byte).await? > 0)
    }
}

/// Boxed: a TLS stream is 1.2 KB, and a connection's task would keep room for it in several of
/// its states.
impl ClientStream for Box<TlsStream<TcpStream>> {
    fn alpn_h2(&self) -> Option<bool> {
        self.get_ref().1.alpn_protocol().map(|p| p == b"h2")
    }

    async fn wait_for_data(&mut self) -> io::Result<bool> {
        let (tcp, tls) = self.get_mut();
        // Plaintext rustls already decrypted is data too.
        let buffered = tls
            .process_new_packets()
            .map_err(io::Error::other)?
            .plaintext_bytes_to_read();
        if buffered == 0 {
            tcp.readable().await?;
        }
        // Records are not looked into here: what came (a request, or a close) is the HTTP
        // connection's to read.
        Ok(true)
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, whose next bytes read are `prefix`.
    pub fn new(inner: S, prefix: Bytes) -> Rewind<S> {
        Rewind { prefix, inner }
    }

    /// The stream, and the bytes not yet read again.
    pub fn into_parts(self) -> (S, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads a connection's first bytes until they tell HTTP/2's preface from anything else.
/// Returns whether it is HTTP/2 and the bytes read (to be read again). A client that closes
/// first gets `Ok(None)`.
pub async fn sniff_h2<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Option<(bool, Bytes)>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        if buf[..len] != H2_PREFACE[..len] {
            return Ok(Some((false, Bytes::copy_from_slice(&buf[..len]))));
        }
    }
    Ok(Some((true, Bytes::copy_from_slice(&buf))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_preface_is_told_from_http1_and_read_again() {
        for (sent, h2) in [
            (&b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"[..], false),
            (&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"[..], true),
            (&b"P"[..], false),
        ] {
            let (mut client, mut server) = tokio::io::duplex(64);
            client.write_all(sent).await.unwrap();
            drop(client);
            let got = sniff_h2(&mut server).await.unwrap();
            let Some((is_h2, prefix)) = got else {
                // Only a client that closed inside the preface gets here.
                assert_eq!(sent, b"P");
                continue;
            };
            assert_eq!(is_h2, h2, "{sent:?}");
            let mut again = Vec::new();
            Rewind::new(server, prefix)
                .read_to_end(&mut again)
                .await
                .unwrap();
            assert_eq!(again, sent);
        }
    }

    #[tokio::test]
    async fn a_client_that_closes_at_once_is_not_served() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(sniff_h2(&mut server).await.unwrap().is_none());
    }
}
