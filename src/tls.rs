//! TLS to PostgreSQL with libpq's settings, over rustls: `sslmode`
//! (`disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full`),
//! `sslrootcert` (a file of CA certificates, or `system`), and `sslcert` /
//! `sslkey` for a client certificate; with libpq's default files under
//! `~/.postgresql/`.

use crate::dsn::Dsn;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use x509_cert::der::Decode;

/// How far the server is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it (libpq's `allow` and `prefer`).
    Prefer,
    /// TLS always; the certificate is checked only against a given CA.
    Require,
    /// TLS, the certificate signed by the CA.
    VerifyCa,
    /// TLS, the certificate signed by the CA and naming the host.
    VerifyFull,
}

/// A connection string's TLS settings.
#[derive(Debug, Clone)]
pub struct Tls {
    mode: Mode,
    rootcert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl Tls {
    /// Takes the TLS settings out of `dsn` (the driver knows only some of
    /// them); libpq's default is `prefer`.
    pub fn take(dsn: &mut Dsn) -> Result<Tls, String> {
        let mode = match dsn.take("sslmode").as_deref() {
            None | Some("prefer") | Some("allow") => Mode::Prefer,
            Some("disable") => Mode::Disable,
            Some("require") => Mode::Require,
            Some("verify-ca") => Mode::VerifyCa,
            Some("verify-full") => Mode::VerifyFull,
            Some(other) => {
                return Err(format!(
                    "sslmode \"{other}\" is none of disable, allow, prefer, require, verify-ca, \
                     verify-full"
                ));
            }
        };
        Ok(Tls {
            mode,
            rootcert: dsn.take("sslrootcert"),
            cert: dsn.take("sslcert"),
            key: dsn.take("sslkey"),
        })
    }

    /// What the driver is told: whether TLS is tried, and whether it must be.
    pub fn ssl_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }

    /// The TLS connector, `None` when TLS is off.
    pub fn connector(&self) -> Result<Option<Connector>, String> {
        if self.mode == Mode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.roots()? {
            Some(roots) => {
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("the CA certificates cannot be used: {e}"))?;
                match self.mode {
                    Mode::VerifyFull => webpki,
                    _ => Arc::new(NameUnchecked {
                        chain: Some(webpki),
                        provider: provider.clone(),
                    }),
                }
            }
            None => Arc::new(NameUnchecked {
                chain: None,
                provider: provider.clone(),
            }),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match self.client_cert()? {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("the client certificate cannot be used: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Some(Connector(Arc::new(config))))
    }

    /// The CAs the server's certificate must come from: `sslrootcert`, or
    /// libpq's `~/.postgresql/root.crt` when it exists; `None` when nothing is
    /// checked (`prefer`, `require` without a CA file).
    fn roots(&self) -> Result<Option<RootCertStore>, String> {
        let verify = matches!(self.mode, Mode::VerifyCa | Mode::VerifyFull);
        let path = match &self.rootcert {
            Some(path) => path.clone(),
            None => {
                let default = home_file("root.crt");
                match default.filter(|p| p.exists()) {
                    Some(p) => p.display().to_string(),
                    None if verify => {
                        return Err(
                            "sslmode verify-ca and verify-full need the CA's certificate: give \
                             sslrootcert=FILE (or sslrootcert=system for the system's trusted \
                             CAs), or put it in ~/.postgresql/root.crt"
                                .into(),
                        );
                    }
                    None => return Ok(None),
                }
            }
        };
        let mut roots = RootCertStore::empty();
        if path == "system" {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "sslrootcert=system: the system has no trusted CA certificates \
                            (apt-get install ca-certificates)"
                        .into(),
                );
            }
            return Ok(Some(roots));
        }
        let certs = read_certs(&path, "sslrootcert")?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("sslrootcert {path}: {e}"))?;
        }
        Ok(Some(roots))
    }

    /// `sslcert` and `sslkey`, or libpq's `~/.postgresql/postgresql.crt` and
    /// `.key` when both exist.
    fn client_cert(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, String> {
        let given = |v: &Option<String>, name: &str| {
            v.clone()
                .or_else(|| home_file(name).map(|p| p.display().to_string()))
        };
        let (Some(cert), Some(key)) = (
            given(&self.cert, "postgresql.crt"),
            given(&self.key, "postgresql.key"),
        ) else {
            return Ok(None);
        };
        if self.cert.is_none() && !std::path::Path::new(&cert).exists() {
            return Ok(None);
        }
        let certs = read_certs(&cert, "sslcert")?;
        let key = PrivateKeyDer::from_pem_file(&key)
            .map_err(|e| format!("sslkey {key}: no private key read: {e}"))?;
        Ok(Some((certs, key)))
    }
}

fn home_file(name: &str) -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql").join(name))
}

fn read_certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {path}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} {path}: no PEM certificate in it"));
    }
    Ok(certs)
}

/// Words for a TLS failure that say which check failed.
pub fn explain(message: &str) -> Option<&'static str> {
    let message = message.to_ascii_lowercase();
    if message.contains("unknownissuer") || message.contains("badsignature") {
        Some(
            "the server's certificate is not signed by a CA in sslrootcert (wrong CA file, or \
             the server's certificate changed)",
        )
    } else if message.contains("notvalidforname") || message.contains("not valid for name") {
        Some(
            "the server's certificate does not name the host connected to (sslmode=verify-full \
             checks it: connect by the name in the certificate)",
        )
    } else if message.contains("expired") {
        Some("the server's certificate has expired")
    } else {
        None
    }
}

/// `verify-ca` (a chain to check), or `prefer` and `require` without a CA (as
/// libpq does: encrypted, the server not checked): the host name is never
/// checked; the handshake's signatures always are.
#[derive(Debug)]
struct NameUnchecked {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NameUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Opens TLS to a server (rustls), and gives SCRAM the channel binding of the
/// server's certificate, which `channel_binding=require` needs.
#[derive(Clone)]
pub struct Connector(Arc<ClientConfig>);

impl<S> MakeTlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Secured<S>;
    type TlsConnect = Connect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, Self::Error> {
        Ok(Connect {
            name: ServerName::try_from(host)?.to_owned(),
            connector: TlsConnector::from(self.0.clone()),
        })
    }
}

/// TLS to one host.
pub struct Connect {
    name: ServerName<'static>,
    connector: TlsConnector,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Secured<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Secured<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { Ok(Secured(self.connector.connect(self.name, stream).await?)) })
    }
}

/// A stream under TLS.
pub struct Secured<S>(TlsStream<S>);

impl<S> Secured<S> {
    /// The `tls-server-end-point` channel binding: the hash of the server's
    /// certificate, with the hash its signature uses (SHA-256 for MD5 and
    /// SHA-1), as PostgreSQL computes it; `None` for a signature that names
    /// no hash (as PostgreSQL, which then offers no binding).
    pub fn end_point(&self) -> Option<Vec<u8>> {
        let cert = self.0.get_ref().1.peer_certificates()?.first()?;
        let parsed = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
        let algorithm = match parsed.signature_algorithm.oid.to_string().as_str() {
            // RSA with MD5, SHA-1, SHA-256; ECDSA with SHA-1, SHA-256.
            "1.2.840.113549.1.1.4"
            | "1.2.840.113549.1.1.5"
            | "1.2.840.113549.1.1.11"
            | "1.2.840.10045.4.1"
            | "1.2.840.10045.4.3.2" => &ring::digest::SHA256,
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &ring::digest::SHA384,
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &ring::digest::SHA512,
            _ => return None,
        };
        Some(
            ring::digest::digest(algorithm, cert.as_ref())
                .as_ref()
                .to_vec(),
        )
    }
}

impl<S> tokio_postgres::tls::TlsStream for Secured<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn channel_binding(&self) -> ChannelBinding {
        self.end_point()
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Secured<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Secured<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
