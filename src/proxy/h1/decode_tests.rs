use super::*;
use crate::proxy::h1::wire::WireError;

/// Feeds `input` to `decoder` `step` bytes at a time; returns the body bytes, how decoding
/// ended (`Ok(true)`: at the body's end, `Ok(false)`: wanting more) and the bytes left unread.
fn decode(
    mut decoder: Decoder,
    input: &[u8],
    step: usize,
) -> (Vec<u8>, Result<bool, WireError>, Vec<u8>) {
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut pieces = input.chunks(step);
    loop {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Data(d)) => {
                assert!(!d.is_empty());
                body.extend_from_slice(&d);
            }
            Ok(Decoded::End) => {
                assert!(decoder.is_done());
                let rest: Vec<u8> = pieces.flatten().copied().collect();
                return (body, Ok(true), [&buf[..], &rest].concat());
            }
            Ok(Decoded::NeedMore) => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return (body, Ok(false), buf.to_vec()),
            },
            Err(e) => return (body, Err(e), Vec::new()),
        }
    }
}

/// The same answer at every step size.
fn decode_all_steps(decoder: Decoder, input: &[u8]) -> (Vec<u8>, Result<bool, WireError>, Vec<u8>) {
    let whole = decode(decoder, input, input.len().max(1));
    for step in 1..input.len() {
        assert_eq!(decode(decoder, input, step), whole, "step {step}");
    }
    whole
}

#[test]
fn sized_bodies_end_at_their_length() {
    let (body, end, rest) = decode_all_steps(Decoder::length(5), b"helloHTTP/1.1");
    assert_eq!(
        (&body[..], end, &rest[..]),
        (&b"hello"[..], Ok(true), &b"HTTP/1.1"[..])
    );
    let (body, end, _) = decode_all_steps(Decoder::length(5), b"hel");
    assert_eq!((&body[..], end), (&b"hel"[..], Ok(false)));
    let mut short = Decoder::length(5);
    assert_eq!(short.at_close(), Err(WireError::Closed));
    let mut open = Decoder::UntilClose;
    let (body, end, _) = decode_all_steps(open, b"all of it");
    assert_eq!((&body[..], end), (&b"all of it"[..], Ok(false)));
    assert_eq!(open.at_close(), Ok(()));
    assert!(open.is_done());
}

#[test]
fn chunked_bodies_with_extensions_and_trailers() {
    let wire = b"5\r\nhello\r\n1A;name=\"v\" ; x\r\nabcdefghijklmnopqrstuvwxyz\r\n00 \r\nx-t: 1\r\ny: 2\r\n\r\nNEXT";
    let (body, end, rest) = decode_all_steps(Decoder::chunked(), wire);
    assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz");
    assert_eq!((end, &rest[..]), (Ok(true), &b"NEXT"[..]));
    let (body, end, rest) = decode_all_steps(Decoder::chunked(), b"3\r\nabc\r\n0\r\n\r\n");
    assert_eq!((&body[..], end, rest.len()), (&b"abc"[..], Ok(true), 0));
    // Upper-case hex, and 16 digits with leading zeros.
    let (body, end, _) = decode_all_steps(
        Decoder::chunked(),
        b"000000000000000A\r\n0123456789\r\n0\r\n\r\n",
    );
    assert_eq!((&body[..], end), (&b"0123456789"[..], Ok(true)));
    // Cut anywhere before the end: wants more, or at close fails.
    let (_, end, _) = decode_all_steps(Decoder::chunked(), b"3\r\nabc\r\n0\r\n");
    assert_eq!(end, Ok(false));
    assert_eq!(Decoder::chunked().at_close(), Err(WireError::Closed));
}

#[test]
fn malformed_chunked_framing_is_refused() {
    let cases: &[(&[u8], WireError)] = &[
        (b"\r\n", WireError::ChunkSize),
        (b"g\r\n", WireError::ChunkSize),
        (b"5\n", WireError::ChunkSize),
        (b";x\r\n", WireError::ChunkSize),
        (b"5;x\nhello", WireError::ChunkSize),
        (b"10000000000000000\r\n", WireError::ChunkSize),
        (b"5\r\nhelloX\r\n", WireError::ChunkEnd),
        (b"5\r\nhello\rX", WireError::ChunkEnd),
        (b"5\r\nhello\n", WireError::ChunkEnd),
        (b"0\r\nx: 1\n\r\n", WireError::Trailers),
        (b"0\r\n\rX", WireError::Trailers),
    ];
    for (wire, err) in cases {
        let (_, end, _) = decode_all_steps(Decoder::chunked(), wire);
        assert_eq!(end, Err(*err), "{:?}", String::from_utf8_lossy(wire));
    }
    let long_ext = format!("1;{}\r\n", "e".repeat(usize::from(MAX_CHUNK_LINE)));
    assert_eq!(
        decode(Decoder::chunked(), long_ext.as_bytes(), 64).1,
        Err(WireError::ChunkSize)
    );
    let long_trailers = format!("0\r\n{}\r\n\r\n", "t".repeat(usize::from(MAX_TRAILERS)));
    assert_eq!(
        decode(Decoder::chunked(), long_trailers.as_bytes(), 64).1,
        Err(WireError::Trailers)
    );
}

#[test]
fn chunks_in_the_buffer_go_out_as_one_slice() {
    let mut decoder = Decoder::chunked();
    let mut buf = BytesMut::from(&b"5\r\nhello\r\n1;x\r\n \r\n5\r\nworld\r\n5\r\nabc"[..]);
    let data = decoder.decode(&mut buf);
    assert_eq!(
        data,
        Ok(Decoded::Data(Bytes::from_static(b"hello worldabc")))
    );
    assert!(!decoder.is_done());
    assert!(buf.is_empty());
    // The rest of a chunk cut short, then the last chunk and trailers in one read: one slice
    // that says it was the last, and the bytes after the body left unread.
    buf.extend_from_slice(b"de\r\n2\r\nfg\r\n0\r\nx-t: 1\r\n\r\nHTTP/1.1");
    let data = decoder.decode(&mut buf);
    assert_eq!(data, Ok(Decoded::Data(Bytes::from_static(b"defg"))));
    assert!(decoder.is_done());
    assert_eq!(&buf[..], b"HTTP/1.1");
    assert_eq!(decoder.decode(&mut buf), Ok(Decoded::End));
}

#[test]
fn data_before_a_framing_error_goes_out_first() {
    let mut decoder = Decoder::chunked();
    let mut buf = BytesMut::from(&b"2\r\nab\r\n3\r\ncde\r\nzz\r\n"[..]);
    assert_eq!(
        decoder.decode(&mut buf),
        Ok(Decoded::Data(Bytes::from_static(b"abcde")))
    );
    assert_eq!(&buf[..], b"zz\r\n");
    assert_eq!(decoder.decode(&mut buf), Err(WireError::ChunkSize));
    assert_eq!(&buf[..], b"zz\r\n");
}
