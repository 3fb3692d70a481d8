//! Active health checks: `GET <endpoint><health_path>` on every endpoint of a pool every
//! `health_interval`. A 2xx answer within the bound un-ejects an endpoint at once; anything else
//! counts as a failure toward ejection, like a failed request.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pool::{EndpointSpec, Pool};
use crate::stream::ChunksBody;

/// Longest wait for one health answer.
pub const MAX_CHECK_TIME: Duration = Duration::from_secs(5);

/// Checks the pool's endpoints until `shutdown`; returns at once when the pool has no check.
pub async fn run(pool: Arc<Pool>, shutdown: CancellationToken) {
    let Some(path) = pool.health_path.clone() else {
        return;
    };
    let path: Arc<str> = path.into();
    let bound = pool.health_interval.min(MAX_CHECK_TIME);
    let mut ticker = tokio::time::interval(pool.health_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut checks = JoinSet::new();
        for index in 0..pool.endpoints.len() {
            let (pool, path) = (Arc::clone(&pool), Arc::clone(&path));
            checks.spawn(async move {
                let healthy = check(&pool, index, &path, bound).await;
                pool.balancer.health_check(index, healthy, Instant::now());
                if !healthy {
                    tracing::debug!(pool = %pool.name, endpoint = %pool.endpoints[index].label, "health check failed");
                }
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = async { while checks.join_next().await.is_some() {} } => {}
        }
    }
}

async fn check(pool: &Pool, index: usize, path: &str, bound: Duration) -> bool {
    let endpoint = &pool.endpoints[index];
    let EndpointSpec::Http { h2c, .. } = &endpoint.spec else {
        return true; // in-process backends are always there
    };
    let Some(uri) = endpoint.uri_for(path) else {
        return false;
    };
    let mut req = Request::new(ChunksBody::new(Arc::from([]), 0));
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    if let Some(auth) = &pool.authorization {
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, auth.clone());
    }
    matches!(
        tokio::time::timeout(bound, pool.client.for_h2c(*h2c).request(req)).await,
        Ok(Ok(response)) if response.status().is_success()
    )
}
