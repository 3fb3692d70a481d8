//! TLS for the HTTPS listener: certificates chosen by SNI, ALPN `h2` / `http/1.1`, and
//! certificates reloaded from disk without a restart.
//!
//! Each configured certificate serves the names its certificate is valid for (exact names and
//! wildcards such as `*.arkor.app`, as webpki checks them); a handshake without SNI gets the
//! first. The set lives behind a lock that a handshake only reads for an `Arc` clone; the reload
//! loop swaps in a whole new set, or — when any file does not load — keeps the last good one.
//! Protocol versions and cipher suites are rustls' safe defaults (TLS 1.2 and 1.3).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_util::sync::CancellationToken;

use crate::config::CertFiles;

/// Whether a certificate's end-entity certificate is valid for `name`.
fn serves(key: &CertifiedKey, name: &ServerName<'_>) -> bool {
    key.cert.first().is_some_and(|der| {
        webpki::EndEntityCert::try_from(der)
            .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(name).is_ok())
    })
}

/// A sibling of `name` (same parent, another first label) that no exact certificate names: a
/// certificate valid for `name` but not for the sibling matched `name` exactly, not through a
/// wildcard.
fn sibling(name: &str) -> Option<ServerName<'static>> {
    let (_, parent) = name.split_once('.')?;
    ServerName::try_from(format!("arkor-edge-wildcard-probe.{parent}")).ok()
}

/// Picks a certificate by SNI from the current set.
#[derive(Debug)]
pub struct CertResolver {
    current: RwLock<Arc<Vec<Arc<CertifiedKey>>>>,
}

impl CertResolver {
    fn set(&self, keys: Vec<Arc<CertifiedKey>>) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(keys);
    }

    fn snapshot(&self) -> Arc<Vec<Arc<CertifiedKey>>> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let keys = self.snapshot();
        let Some(sni) = hello.server_name() else {
            return keys.first().cloned();
        };
        let name = ServerName::try_from(sni).ok()?;
        // An exact name wins over a wildcard, whatever the order in the config.
        let probe = sibling(sni);
        keys.iter()
            .find(|key| serves(key, &name) && probe.as_ref().is_none_or(|p| !serves(key, p)))
            .or_else(|| keys.iter().find(|key| serves(key, &name)))
            .cloned()
    }
}

/// Loads every configured certificate; fails on the first that does not load, naming it.
fn load_all(
    files: &[CertFiles],
    provider: &CryptoProvider,
) -> Result<Vec<Arc<CertifiedKey>>, String> {
    files
        .iter()
        .map(|f| load_one(&f.cert, &f.key, provider))
        .collect()
}

fn load_one(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified
        .keys_match()
        .map_err(|e| format!("{} and {} do not match: {e}", cert.display(), key.display()))?;
    Ok(Arc::new(certified))
}

/// The TLS side of the HTTPS listener.
pub struct Tls {
    /// The rustls configuration handshakes use.
    pub config: Arc<ServerConfig>,
    resolver: Arc<CertResolver>,
    files: Vec<CertFiles>,
    provider: Arc<CryptoProvider>,
}

impl Tls {
    /// Loads the certificates (a start fails if any does not load) and builds the server config.
    pub fn new(files: Vec<CertFiles>) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let keys = load_all(&files, &provider)?;
        let resolver = Arc::new(CertResolver {
            current: RwLock::new(Arc::new(keys)),
        });
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            config: Arc::new(config),
            resolver,
            files,
            provider,
        })
    }

    /// Re-reads every certificate and key; on success the new set serves the next handshakes,
    /// on failure the last good set stays. Connections already open are not touched.
    pub fn reload(&self) -> Result<(), String> {
        let keys = load_all(&self.files, &self.provider)?;
        self.resolver.set(keys);
        Ok(())
    }

    /// Watches the files' modification times and reloads when any changes, until `shutdown`.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut last = self.stamps();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = self.stamps();
            if now == last {
                continue;
            }
            last = now;
            match self.reload() {
                Ok(()) => tracing::info!("tls certificates reloaded"),
                Err(e) => {
                    tracing::error!("tls certificates not reloaded, keeping the last good set: {e}")
                }
            }
        }
    }

    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        let stamp = |p: &PathBuf| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        self.files
            .iter()
            .flat_map(|f| [stamp(&f.cert), stamp(&f.key)])
            .collect()
    }
}

/// Normalises a TLS server name for comparison with a Host: lower case, no trailing dot.
pub fn normalise_sni(sni: &str) -> Box<str> {
    sni.strip_suffix('.')
        .unwrap_or(sni)
        .to_ascii_lowercase()
        .into()
}
