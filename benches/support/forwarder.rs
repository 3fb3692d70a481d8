//! A bare hyper forwarder: the floor for any hyper-based proxy. It accepts HTTP/1.1 and h2c
//! like the edge, sends every request as it came (headers and body untouched, no auth, no
//! rewrite, no limits) to one upstream over a pooled hyper-util client, and streams the response
//! back. Whatever the edge costs above this is the price of its own work.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::Uri;
use http::uri::{Authority, Scheme};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type BoxBody = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

const BAD_GATEWAY: &str = r#"{"error":{"message":"upstream failed","type":"server_error","param":null,"code":"upstream_error"}}"#;

/// Serves on `listener`, forwarding to `upstream`, until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, upstream: SocketAddr) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector);
    let authority: Authority = match upstream.to_string().parse() {
        Ok(a) => a,
        Err(_) => return,
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, authority, builder) = (client.clone(), authority.clone(), builder.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: http::Request<Incoming>| {
                let client = client.clone();
                let mut parts = req.uri().clone().into_parts();
                parts.scheme = Some(Scheme::HTTP);
                parts.authority = Some(authority.clone());
                async move {
                    if let Ok(uri) = Uri::from_parts(parts) {
                        *req.uri_mut() = uri;
                    }
                    *req.version_mut() = http::Version::HTTP_11;
                    let resp = match client.request(req).await {
                        Ok(r) => r.map(BoxBody::new),
                        Err(_) => {
                            let body = http_body_util::Full::new(bytes::Bytes::from_static(
                                BAD_GATEWAY.as_bytes(),
                            ))
                            .map_err(|e: Infallible| match e {});
                            let mut r = http::Response::new(BoxBody::new(body));
                            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                            r
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
