//! hyper's pooled HTTP clients for one backend pool, with the pool's connect timeout and
//! idle-connection settings: h2c (prior knowledge) for proxied requests to h2c endpoints, and
//! both protocols for the edge's own calls (health checks, adapter loads). Proxied requests to
//! HTTP/1.1 endpoints use [`super::h1`].

use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::stream::ChunksBody;

/// Keep-alive connections to one pool's endpoints.
#[derive(Debug, Clone)]
pub struct PoolClient {
    h1: Client<HttpConnector, ChunksBody>,
    h2c: Client<HttpConnector, ChunksBody>,
}

impl PoolClient {
    /// Clients that connect within `connect`, keep at most `max_idle` idle connections per
    /// endpoint and drop them after `idle_timeout`.
    pub fn new(connect: Duration, max_idle: usize, idle_timeout: Duration) -> PoolClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(idle_timeout)
            .pool_max_idle_per_host(max_idle);
        let h1 = builder.build(connector.clone());
        let h2c = builder.http2_only(true).build(connector);
        PoolClient { h1, h2c }
    }

    /// The client for an endpoint speaking h2c (`true`) or HTTP/1.1.
    pub fn for_h2c(&self, h2c: bool) -> &Client<HttpConnector, ChunksBody> {
        if h2c { &self.h2c } else { &self.h1 }
    }
}
