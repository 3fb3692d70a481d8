//! Pull sync from a control plane: `GET {url}/v1/edge/snapshot`, then the SSE stream
//! `GET {url}/v1/edge/events?after=N`, reconnecting with jittered exponential backoff.
