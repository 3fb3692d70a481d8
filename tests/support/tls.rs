//! A test CA made at test time (rcgen), certificates it signs, and a TLS client that trusts it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pub pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "arkor-edge test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            params,
            key,
        }
    }

    /// Issues a certificate for `names` and writes `<stem>.pem` / `<stem>.key` into `dir`.
    /// Returns the certificate's DER, to recognise it in a handshake.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> CertificateDer<'static> {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    /// A client configuration trusting this CA, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

/// Connects to `addr` with SNI `sni` (verifying the certificate for that name).
pub async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    connector.connect(name, tcp).await
}

/// The certificate the server presented.
pub fn peer_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// The negotiated ALPN protocol.
pub fn alpn(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

/// The edge with its HTTPS listener on: a wildcard `*.arkor.app` certificate first, then an
/// exact `special.arkor.app` one, both from a fresh CA. Returns the edge, the CA and the two
/// certificates' DER.
pub async fn start_tls_edge(
    endpoints: &[String],
) -> (
    super::TestEdge,
    TestCa,
    CertificateDer<'static>,
    CertificateDer<'static>,
) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("deployments.json"),
        super::fixture(1).to_string(),
    )
    .unwrap();
    let ca = TestCa::new();
    let wildcard = ca.issue(dir.path(), "wildcard", &["*.arkor.app"]);
    let special = ca.issue(dir.path(), "special", &["special.arkor.app"]);
    // Idle connections are parked after 10 ms, so the TLS tests cross parking.
    let toml = super::config_toml(
        endpoints,
        "",
        "file = \"deployments.json\"",
        "[tls]\ncerts = [{ cert = \"wildcard.pem\", key = \"wildcard.key\" }, \
         { cert = \"special.pem\", key = \"special.key\" }]\nreload_interval = \"50ms\"\n\
         [limits]\nwarm_connections = 0\n",
    )
    .replace(
        "admin = \"127.0.0.1:0\"",
        "admin = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"",
    );
    let edge = super::TestEdge::launch(dir, &toml).await;
    (edge, ca, wildcard, special)
}
