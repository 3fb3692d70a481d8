use super::*;
use crate::proxy::h1::decode::Decoder;

fn head(text: &str) -> Result<Option<Head>, WireError> {
    parse_head(&mut BytesMut::from(text), false, &mut 0)
}

fn complete(text: &str) -> Head {
    head(text).unwrap().unwrap()
}

#[test]
fn request_head_is_origin_form_with_the_headers_as_given() {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("b:8000"));
    headers.append("x-a", HeaderValue::from_static("1"));
    headers.append("x-a", HeaderValue::from_static("2"));
    let mut out = b"left over".to_vec();
    out.clear();
    write_head(
        &mut out,
        &Method::POST,
        "/v1/chat/completions?x=1",
        &headers,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: b:8000\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
    );
}

#[test]
fn response_head_parses_once_whole_and_leaves_the_body() {
    let text = "HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello";
    let head_len = text.len() - 5;
    for cut in 0..head_len {
        let mut buf = BytesMut::from(&text[..cut]);
        assert!(
            parse_head(&mut buf, false, &mut 0).unwrap().is_none(),
            "cut {cut}"
        );
        assert_eq!(buf.len(), cut, "nothing consumed before the head is whole");
    }
    let mut buf = BytesMut::from(text);
    let head = parse_head(&mut buf, false, &mut 0).unwrap().unwrap();
    assert_eq!(&buf[..], b"hello");
    let r = &head.response;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.version(), Version::HTTP_11);
    let xa: Vec<_> = r.headers().get_all("x-a").iter().collect();
    assert_eq!(xa, ["1", "2"]);
    assert_eq!(*r.body(), Decoder::Length(5));
    assert!(head.keep_alive);
}

#[test]
fn interim_responses_are_skipped_and_upgrades_refused() {
    let h = complete(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    );
    assert_eq!(h.response.status(), StatusCode::OK);
    assert!(h.response.headers().get("link").is_none());
    assert_eq!(*h.response.body(), Decoder::Done);
    // An interim response whole and the final one not yet: the interim one is consumed.
    let mut buf = BytesMut::from("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2");
    assert!(parse_head(&mut buf, false, &mut 0).unwrap().is_none());
    assert_eq!(&buf[..], b"HTTP/1.1 2");
    assert_eq!(
        head("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n").unwrap_err(),
        WireError::Upgrade
    );
}

#[test]
fn interim_responses_are_bounded_per_request_across_reads() {
    const CONTINUE: &str = "HTTP/1.1 100 Continue\r\n\r\n";
    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let max = MAX_INTERIM as usize;
    assert!(head(&(CONTINUE.repeat(max) + OK)).unwrap().is_some());
    assert_eq!(
        head(&(CONTINUE.repeat(max + 1) + OK)).unwrap_err(),
        WireError::Interim
    );
    // Counted across calls: each read brings a few, and the count carries over.
    let mut interim = 0;
    let mut buf = BytesMut::new();
    for _ in 0..max / 2 {
        buf.extend_from_slice(CONTINUE.repeat(2).as_bytes());
        assert!(parse_head(&mut buf, false, &mut interim).unwrap().is_none());
        assert!(buf.is_empty(), "interim responses are consumed");
    }
    assert_eq!(interim, MAX_INTERIM);
    buf.extend_from_slice(CONTINUE.as_bytes());
    assert_eq!(
        parse_head(&mut buf, false, &mut interim).unwrap_err(),
        WireError::Interim
    );
}

#[test]
fn malformed_and_oversized_heads_are_refused() {
    assert!(matches!(
        head("HTTP/2 200 OK\r\n\r\n"),
        Err(WireError::Head(_))
    ));
    assert!(matches!(
        head("HTTP/1.1 2000 OK\r\n\r\n"),
        Err(WireError::Head(_))
    ));
    assert!(matches!(
        head("HTTP/1.1 200 OK\r\nbad header\r\n\r\n"),
        Err(WireError::Head(_))
    ));
    let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
    assert!(matches!(
        head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")),
        Err(WireError::Head(_))
    ));
    let big = format!("HTTP/1.1 200 OK\r\nx: {}\r\n", "v".repeat(MAX_HEAD));
    assert_eq!(head(&big).unwrap_err(), WireError::HeadTooLarge);
    assert_eq!(
        head(&format!("{big}\r\n")).unwrap_err(),
        WireError::HeadTooLarge
    );
}

#[test]
fn framing_follows_rfc_9112() {
    let framed = |headers: &str| {
        let h = complete(&format!("HTTP/1.1 200 OK\r\n{headers}\r\n"));
        (*h.response.body(), h.keep_alive)
    };
    assert_eq!(framed("content-length: 7\r\n"), (Decoder::Length(7), true));
    assert_eq!(
        framed("content-length: 7, 7\r\ncontent-length: 7\r\n"),
        (Decoder::Length(7), true)
    );
    assert_eq!(framed("content-length: 0\r\n"), (Decoder::Done, true));
    assert_eq!(
        framed("transfer-encoding: chunked\r\n"),
        (Decoder::chunked(), true)
    );
    assert_eq!(
        framed("transfer-encoding: gzip\r\ntransfer-encoding: Chunked\r\n"),
        (Decoder::chunked(), true)
    );
    // Both: the transfer coding wins, and the connection is not trusted after it.
    assert_eq!(
        framed("transfer-encoding: chunked\r\ncontent-length: 3\r\n"),
        (Decoder::chunked(), false)
    );
    assert_eq!(
        framed("transfer-encoding: chunked, gzip\r\n"),
        (Decoder::UntilClose, false)
    );
    assert_eq!(framed(""), (Decoder::UntilClose, false));
    for bad in ["7, 8", "+7", "-1", "7a", "", "99999999999999999999"] {
        let text = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
        assert_eq!(
            head(&text).unwrap_err(),
            WireError::ContentLength,
            "{bad:?}"
        );
    }
    // No body after 204, 304, or any answer to HEAD, whatever the head says.
    for code in ["204 No Content", "304 Not Modified"] {
        let h = complete(&format!("HTTP/1.1 {code}\r\ncontent-length: 9\r\n\r\n"));
        assert_eq!(*h.response.body(), Decoder::Done);
    }
    let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
    let h = parse_head(&mut buf, true, &mut 0).unwrap().unwrap();
    assert_eq!((*h.response.body(), h.keep_alive), (Decoder::Done, true));
}

#[test]
fn keep_alive_by_version_and_connection_header() {
    let alive = |text: &str| complete(text).keep_alive;
    assert!(alive("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
    assert!(!alive(
        "HTTP/1.1 200 OK\r\nconnection: Keep-Alive, CLOSE\r\ncontent-length: 0\r\n\r\n"
    ));
    assert!(!alive("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"));
    assert!(alive(
        "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"
    ));
    let h = complete("HTTP/1.0 200 OK\r\n\r\n");
    assert_eq!(h.response.version(), Version::HTTP_10);
}
