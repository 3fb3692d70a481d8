//! TEMPORARY interface copy while the real scanner is written on the `usage` branch.
use bytes::Bytes;
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}
pub struct JsonUsageScan;
impl JsonUsageScan {
    pub fn new() -> Self {
        JsonUsageScan
    }
    pub fn feed(&mut self, _chunk: &[u8]) {}
    pub fn usage(&self) -> Option<Usage> {
        None
    }
}
pub struct SseUsageScan;
pub struct Forward(Option<Bytes>);
impl Forward {
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}
impl Iterator for Forward {
    type Item = Bytes;
    fn next(&mut self) -> Option<Bytes> {
        self.0.take()
    }
}
impl SseUsageScan {
    pub fn new(_strip: bool) -> Self {
        SseUsageScan
    }
    pub fn feed(&mut self, frame: Bytes) -> Forward {
        Forward(Some(frame))
    }
    pub fn finish(&mut self) -> Forward {
        Forward(None)
    }
    pub fn usage(&self) -> Option<Usage> {
        None
    }
}
