//! Posts usage to the control plane: `POST {url}/v1/edge/usage` with
//! `{"reports":[{"keyId","deploymentId","lastUsedAt","requests","promptTokens","completionTokens"}]}`
//! every `usage.report_interval`. Best effort: a failed post is retried once, then its counts
//! are kept for the next report (within the sink's bound). A last report goes out at shutdown.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use super::{Report, UsageSink};
use crate::config::Secret;
use crate::metrics as m;

/// Posts the sink's reports to the control plane.
pub struct Reporter {
    pub sink: Arc<UsageSink>,
    /// `{url}/v1/edge/usage`.
    pub endpoint: String,
    pub token: Option<Secret>,
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(serde::Serialize)]
struct Body<'a> {
    reports: &'a [Report],
}

impl Reporter {
    /// Reports every interval until `shutdown`, then once more.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(self.timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate; nothing to report yet
        loop {
            let last = tokio::select! {
                _ = ticker.tick() => false,
                _ = shutdown.cancelled() => true,
            };
            self.report(&client).await;
            if last {
                return;
            }
        }
    }

    async fn report(&self, client: &Client<HttpConnector, Full<Bytes>>) {
        let reports = self.sink.drain();
        if reports.is_empty() {
            return;
        }
        let body = match serde_json::to_vec(&Body { reports: &reports }) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!("cannot encode the usage report: {e}");
                return;
            }
        };
        for attempt in 0..2 {
            match self.post(client, body.clone()).await {
                Ok(()) => {
                    metrics::counter!(m::USAGE_REPORTS, "result" => "ok").increment(1);
                    return;
                }
                Err(e) => tracing::warn!(attempt, "usage report not accepted: {e}"),
            }
        }
        metrics::counter!(m::USAGE_REPORTS, "result" => "failed").increment(1);
        self.sink.restore(reports);
    }

    async fn post(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
        body: Bytes,
    ) -> Result<(), String> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.endpoint.parse().map_err(|e| format!("{e}"))?;
        let h = req.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(token) = &self.token {
            let value = HeaderValue::try_from(format!("Bearer {}", token.expose()))
                .map_err(|_| "token is not a header value".to_owned())?;
            h.insert(AUTHORIZATION, value);
        }
        match tokio::time::timeout(self.timeout, client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(format!("status {}", resp.status())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        }
    }
}
