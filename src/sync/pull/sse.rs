//! A byte-level Server-Sent Events parser (the WHATWG `text/event-stream` rules), kept pure so
//! that every way a stream can be cut into chunks is testable without a socket.
//!
//! Lines end with LF, CRLF or CR (a CRLF split across two chunks is one line end); `data:` lines
//! of one event are joined with `\n`; a blank line dispatches the event; lines starting with `:`
//! are comments (keep-alives); `event`, `id`, `retry` and unknown fields are ignored, since the
//! control plane's events say everything in their data. A leading UTF-8 BOM is skipped.
//!
//! Memory is bounded: an event (its data so far plus the line being read) longer than the
//! parser's limit is discarded — reported once — and the parser resynchronises at the next blank
//! line, so one over-long or garbled event never poisons the rest of the stream.

/// What the parser reports, in stream order.
#[derive(Debug, PartialEq, Eq)]
pub enum EventPart<'a> {
    /// A dispatched event's data, lines joined with `\n` (borrowed until the callback returns).
    Data(&'a [u8]),
    /// A comment line (`:` …), which control planes send as keep-alives.
    Comment,
    /// An event went over the size limit and is being skipped up to the next blank line.
    Discarded,
}

/// Incremental parser state; feed it chunks as they arrive.
#[derive(Debug)]
pub struct SseParser {
    /// The current line when it spans chunks (empty while discarding).
    line: Vec<u8>,
    /// Bytes seen on the current line, stored or not: a blank line is one with none.
    line_len: usize,
    /// Whether the last byte seen was CR, so that an LF right after it is not a second line end.
    after_cr: bool,
    /// Whether the first line (which may start with a BOM) is still ahead.
    first_line: bool,
    event: EventBuf,
}

/// The event being assembled.
#[derive(Debug)]
struct EventBuf {
    data: Vec<u8>,
    has_data: bool,
    /// Skipping an over-long event until the next blank line.
    discarding: bool,
    max: usize,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";
/// A buffer grown past this by one large event is released once the event is dispatched.
const KEEP_CAPACITY: usize = 64 * 1024;

impl SseParser {
    /// A parser that refuses events (data plus the current line) longer than `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> SseParser {
        SseParser {
            line: Vec::new(),
            line_len: 0,
            after_cr: false,
            first_line: true,
            event: EventBuf {
                data: Vec::new(),
                has_data: false,
                discarding: false,
                max: max_event_bytes,
            },
        }
    }

    /// Parses one chunk, calling `on_event` for every event, comment or discard it completes.
    /// An incomplete line or event is kept for the next chunk.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_event: impl FnMut(EventPart<'_>)) {
        if chunk.is_empty() {
            return;
        }
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while !chunk.is_empty() {
            let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) else {
                self.buffer(chunk, &mut on_event);
                return;
            };
            let (part, ending) = (&chunk[..end], chunk[end]);
            if self.line.is_empty() && !self.event.discarding && self.fits(part.len()) {
                // The whole line is in this chunk: parse it in place, without a copy.
                self.line_len = part.len();
                self.end_line(part, &mut on_event);
            } else {
                self.buffer(part, &mut on_event);
                let mut line = std::mem::take(&mut self.line);
                self.end_line(&line, &mut on_event);
                line.clear();
                self.line = line;
            }
            chunk = &chunk[end + 1..];
            if ending == b'\r' {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
    }

    /// Keeps part of a line that continues in a later chunk, within the limit.
    fn buffer(&mut self, part: &[u8], on_event: &mut impl FnMut(EventPart<'_>)) {
        self.line_len += part.len();
        if self.event.discarding {
            return;
        }
        if !self.fits(self.line.len() + part.len()) {
            self.line.clear();
            self.event.discard(on_event);
            return;
        }
        self.line.extend_from_slice(part);
    }

    /// Whether a line of `line_len` bytes still fits in the event's limit.
    fn fits(&self, line_len: usize) -> bool {
        line_len + self.event.data.len() <= self.event.max
    }

    /// Handles a complete line (empty while discarding: then only `line_len` matters).
    fn end_line(&mut self, mut line: &[u8], on_event: &mut impl FnMut(EventPart<'_>)) {
        let blank = self.line_len == 0;
        self.line_len = 0;
        if std::mem::take(&mut self.first_line) {
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        if self.event.discarding {
            // Resynchronise at the first blank line after the over-long event.
            self.event.discarding = !blank;
            return;
        }
        self.event.line(line, on_event);
    }
}

impl EventBuf {
    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(EventPart<'_>)) {
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            on_event(EventPart::Comment);
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        if field != b"data" {
            return;
        }
        if self.data.len() + 1 + value.len() > self.max {
            self.discard(on_event);
            return;
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(EventPart<'_>)) {
        if self.has_data {
            on_event(EventPart::Data(&self.data));
        }
        self.reset();
    }

    fn discard(&mut self, on_event: &mut impl FnMut(EventPart<'_>)) {
        self.reset();
        self.discarding = true;
        on_event(EventPart::Discarded);
    }

    fn reset(&mut self) {
        self.data.clear();
        self.has_data = false;
        if self.data.capacity() > KEEP_CAPACITY {
            self.data = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Out {
        Data(String),
        Comment,
        Discarded,
    }

    fn collect(parser: &mut SseParser, chunk: &[u8], out: &mut Vec<Out>) {
        parser.feed(chunk, |part| {
            out.push(match part {
                EventPart::Data(d) => Out::Data(String::from_utf8_lossy(d).into_owned()),
                EventPart::Comment => Out::Comment,
                EventPart::Discarded => Out::Discarded,
            })
        });
    }

    fn parse_chunks(max: usize, chunks: &[&[u8]]) -> Vec<Out> {
        let mut parser = SseParser::new(max);
        let mut out = Vec::new();
        for c in chunks {
            collect(&mut parser, c, &mut out);
        }
        out
    }

    fn parse(text: &str) -> Vec<Out> {
        parse_chunks(1024, &[text.as_bytes()])
    }

    fn data(s: &str) -> Out {
        Out::Data(s.to_owned())
    }

    /// Every way of cutting `text` in two, and byte by byte, parses like the whole.
    fn same_at_every_split(max: usize, text: &[u8]) -> Vec<Out> {
        let whole = parse_chunks(max, &[text]);
        for i in 0..=text.len() {
            let (a, b) = text.split_at(i);
            assert_eq!(parse_chunks(max, &[a, b]), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(parse_chunks(max, &bytes), whole, "byte by byte");
        whole
    }

    #[test]
    fn one_event_per_blank_line() {
        assert_eq!(
            parse("data: {\"a\":1}\n\ndata: b\n\n"),
            [data("{\"a\":1}"), data("b")]
        );
        // Not dispatched until the blank line arrives.
        assert_eq!(parse("data: pending\n"), []);
    }

    #[test]
    fn data_lines_join_with_newline_and_one_space_is_optional() {
        assert_eq!(
            parse("data: a\ndata:b\ndata:  c\ndata\n\n"),
            [data("a\nb\n c\n")]
        );
        assert_eq!(parse("data:\n\n"), [data("")]);
    }

    #[test]
    fn lf_crlf_and_cr_all_end_lines() {
        for text in [
            "data: x\n\ndata: y\n\n",
            "data: x\r\n\r\ndata: y\r\n\r\n",
            "data: x\r\rdata: y\r\r",
            "data: x\r\n\rdata: y\n\r\n",
        ] {
            assert_eq!(parse(text), [data("x"), data("y")], "{text:?}");
        }
        // CR then LF is one line end, never a blank line in between.
        assert_eq!(parse("data: x\r\ndata: y\r\n\r\n"), [data("x\ny")]);
    }

    #[test]
    fn comments_and_other_fields() {
        assert_eq!(
            parse(": keep-alive\n\nevent: change\nid: 7\nretry: 10\nfoo: bar\ndata: z\n\n"),
            [Out::Comment, data("z")]
        );
        // An event with no data is not dispatched.
        assert_eq!(parse("event: ping\n\n\n\n"), []);
    }

    #[test]
    fn a_leading_bom_is_skipped() {
        assert_eq!(
            parse_chunks(64, &[b"\xEF\xBB", b"\xBFdata: x\n\n"]),
            [data("x")]
        );
    }

    #[test]
    fn splits_at_every_byte_position() {
        let text = b"\xEF\xBB\xBF: hi\r\ndata: {\"r\":1}\r\ndata: second\r\n\r\n\
            event: x\rdata: cr\r\rdata:lf\n\n: c\ndata: end\r\n\n";
        let out = same_at_every_split(1024, text);
        assert_eq!(
            out,
            [
                Out::Comment,
                data("{\"r\":1}\nsecond"),
                data("cr"),
                data("lf"),
                Out::Comment,
                data("end"),
            ]
        );
    }

    #[test]
    fn an_overlong_event_is_discarded_and_the_stream_resynchronises() {
        let long = "x".repeat(40);
        // One long line.
        let text = format!("data: {long}\nmore: y\n\ndata: ok\n\n");
        assert_eq!(
            same_at_every_split(32, text.as_bytes()),
            [Out::Discarded, data("ok")]
        );
        // Short lines adding up to too much.
        let text = "data: 0123456789\ndata: 0123456789\ndata: 0123456789\n\ndata: ok\n\n";
        assert_eq!(
            same_at_every_split(32, text.as_bytes()),
            [Out::Discarded, data("ok")]
        );
        // A long garbage line with no field at all.
        let text = format!("{long}{long}\r\n\r\n: c\r\ndata: ok\r\n\r\n");
        assert_eq!(
            same_at_every_split(32, text.as_bytes()),
            [Out::Discarded, Out::Comment, data("ok")]
        );
        // Exactly at the limit is fine.
        let fits = format!("data: {}\n\n", "y".repeat(26));
        assert_eq!(parse_chunks(32, &[fits.as_bytes()]).len(), 1);
        assert_eq!(
            parse_chunks(32, &[fits.as_bytes()])[0],
            data(&"y".repeat(26))
        );
    }

    #[test]
    fn garbage_between_events_does_not_poison_the_stream() {
        let text = b"\x00\xFF garbage\n{not sse}\n\ndata: {broken\n\ndata: good\n\n";
        assert_eq!(
            same_at_every_split(1024, text),
            [data("{broken"), data("good")]
        );
    }

    #[test]
    fn a_big_buffer_is_released_after_its_event() {
        let mut parser = SseParser::new(1 << 20);
        let big = format!("data: {}\n\n", "z".repeat(200_000));
        let mut out = Vec::new();
        collect(&mut parser, big.as_bytes(), &mut out);
        assert_eq!(out.len(), 1);
        assert!(parser.event.data.capacity() <= KEEP_CAPACITY);
    }
}
