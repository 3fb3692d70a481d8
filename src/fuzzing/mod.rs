//! Property checks over untrusted bytes, shared by the fuzz targets (`fuzz/`) and the corpus
//! replay test (`tests/fuzz_corpus.rs`).
//!
//! Each area has one `check(data)` that feeds arbitrary bytes to the edge's own parsers and
//! returns `Err` with a description when a property the SPEC promises does not hold: a reference
//! reading of the same bytes disagrees, a result depends on how a stream was cut into chunks, or
//! state indexes drift apart. A parser that panics fails on its own. The fuzz targets only turn
//! an `Err` into a crash; `cargo test` replays the checked-in corpus through the same functions,
//! so every input the fuzzers kept stays a regression test on the stable toolchain.
//!
//! | module | parser under test |
//! |---|---|
//! | [`host`] | `Host` / `:authority` → [`crate::host::Slug`], base domains |
//! | [`sni`] | the SNI / `Host` comparison behind 421 `misdirected_request` |
//! | [`auth`] | `Authorization` → [`crate::auth::PresentedKey`], [`crate::auth::KeyHash`] hex |
//! | [`pin`] | model pinning, differentially against serde_json and [`json_reader`] |
//! | [`usage`] | the usage scanners over a response cut at arbitrary points |
//! | [`h1`] | the backend HTTP/1.1 response reader: head, framing, chunked decoding |
//! | [`control`] | control-plane events, snapshots and the pull SSE parser |
//! | [`config`] | the TOML configuration file |

pub mod auth;
pub mod config;
pub mod control;
pub mod h1;
pub mod host;
pub mod json_reader;
pub mod pin;
pub mod sni;
pub mod usage;

/// The outcome of one check: `Err` describes the property that did not hold.
pub type Outcome = Result<(), String>;

/// Returns `Err(message)` from the enclosing check when `cond` is false.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}
pub(crate) use ensure;

/// A small deterministic generator (xorshift64*), so chunk boundaries come from the input itself
/// and a saved input always replays the same splits.
#[derive(Debug, Clone)]
pub struct Splitter {
    state: u64,
}

impl Splitter {
    /// A generator seeded from (up to) eight bytes.
    pub fn new(seed: &[u8]) -> Splitter {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for &b in seed.iter().take(8) {
            state = (state ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
        Splitter { state: state | 1 }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Cuts `data` into consecutive pieces of 0 to `max` bytes (empty pieces included: a frame
    /// may be empty), covering it exactly.
    pub fn split<'a>(&mut self, data: &'a [u8], max: usize) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let len = usize::try_from(self.next() % (max as u64 + 1)).unwrap_or(1);
            let end = (at + len).min(data.len());
            out.push(&data[at..end]);
            at = end;
        }
        out
    }
}

/// Every way the checks cut a stream: whole, one byte at a time, and two seeded random splits
/// (small and larger pieces).
pub fn splits<'a>(data: &'a [u8], seed: &[u8]) -> Vec<Vec<&'a [u8]>> {
    let mut rng = Splitter::new(seed);
    vec![
        vec![data],
        data.chunks(1).collect(),
        rng.split(data, 7),
        rng.split(data, 64),
    ]
}

/// Splits `data` at its first `\n`: the line before it and everything after it.
pub(crate) fn first_line(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let nl = memchr::memchr(b'\n', data)?;
    Some((&data[..nl], &data[nl + 1..]))
}

/// The WHATWG event-stream rule for one non-blank, non-comment line, shared by the reference
/// parsers: a `data` field's value (after one optional space) is appended to the event's data,
/// joined with LF; other fields are ignored.
pub(crate) fn sse_data_line(line: &[u8], data: &mut Option<Vec<u8>>) {
    let (field, value) = match line.iter().position(|b| *b == b':') {
        Some(c) => {
            let v = &line[c + 1..];
            (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
        }
        None => (line, &[][..]),
    };
    if field != b"data" {
        return;
    }
    match data {
        Some(d) => {
            d.push(b'\n');
            d.extend_from_slice(value);
        }
        None => *data = Some(value.to_vec()),
    }
}
