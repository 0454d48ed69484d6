//! Real quinn servers and clients on loopback: which handshakes succeed.

mod common;

use std::fs;
use std::path::PathBuf;

use common::{accept, alpn_of, connect, server, within};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use statecast_transport::{ALPN_CLIENT, ALPN_UPSTREAM, TlsConfig, TlsError, Trust};

fn dev(dir: &tempfile::TempDir) -> TlsConfig {
    Trust::dev(dir.path()).load().unwrap()
}

#[tokio::test]
async fn handshake_with_the_right_alpn_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let server_tls = dev(&dir);
    let client_tls = dev(&dir);
    let (endpoint, addr) = server(&server_tls, &[ALPN_CLIENT]);

    let (client, accepted) = tokio::join!(
        connect(&client_tls, &[ALPN_CLIENT], addr, "localhost"),
        accept(&endpoint)
    );
    let client = client.expect("client handshake");
    let accepted = accepted.expect("server handshake");
    assert_eq!(alpn_of(&client).as_deref(), Some(ALPN_CLIENT));
    assert_eq!(alpn_of(&accepted).as_deref(), Some(ALPN_CLIENT));
    // No client certificate was asked for.
    assert!(accepted.peer_identity().is_none());
}

#[tokio::test]
async fn the_dev_leaf_is_valid_for_loopback_ip_names() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dev(&dir);
    let (endpoint, addr) = server(&tls, &[ALPN_UPSTREAM]);
    for name in ["127.0.0.1", "localhost"] {
        let (client, accepted) = tokio::join!(
            connect(&tls, &[ALPN_UPSTREAM], addr, name),
            accept(&endpoint)
        );
        client.unwrap_or_else(|e| panic!("connect as {name}: {e}"));
        accepted.unwrap();
    }
}

#[tokio::test]
async fn extra_names_are_in_the_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let server_tls = Trust::dev(dir.path())
        .with_names(["relay1.statecast.test"])
        .load()
        .unwrap();
    let client_tls = dev(&dir);
    let (endpoint, addr) = server(&server_tls, &[ALPN_CLIENT]);
    let (client, accepted) = tokio::join!(
        connect(&client_tls, &[ALPN_CLIENT], addr, "relay1.statecast.test"),
        accept(&endpoint)
    );
    client.unwrap();
    accepted.unwrap();

    // A name the leaf does not carry is refused.
    let (client, accepted) = tokio::join!(
        connect(&client_tls, &[ALPN_CLIENT], addr, "other.statecast.test"),
        accept(&endpoint)
    );
    let err = client.expect_err("a name outside the certificate must fail");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(accepted.is_err());
}

#[tokio::test]
async fn handshake_with_a_wrong_alpn_fails() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dev(&dir);
    let (endpoint, addr) = server(&tls, &[ALPN_CLIENT]);

    let (client, accepted) = tokio::join!(
        connect(&tls, &[ALPN_UPSTREAM], addr, "localhost"),
        accept(&endpoint)
    );
    let err = client.expect_err("a client offering another ALPN must be refused");
    // TLS alert 120 (no_application_protocol), as a QUIC crypto error.
    assert!(
        err.to_string().contains("120")
            || err
                .to_string()
                .to_lowercase()
                .contains("application protocol"),
        "{err}"
    );
    assert!(accepted.is_err());
}

#[tokio::test]
async fn a_client_trusting_another_ca_refuses_the_server() {
    let server_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let server_tls = dev(&server_dir);
    let client_tls = dev(&client_dir);
    assert_ne!(
        server_tls.ca_certificates(),
        client_tls.ca_certificates(),
        "two data directories must hold two CAs"
    );
    let (endpoint, addr) = server(&server_tls, &[ALPN_CLIENT]);

    let (client, accepted) = tokio::join!(
        connect(&client_tls, &[ALPN_CLIENT], addr, "localhost"),
        accept(&endpoint)
    );
    let err = client.expect_err("the server's certificate comes from an unknown CA");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert!(accepted.is_err());
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_of_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dev(&dir);
    let endpoint = statecast_transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        tls.server_config_mutual(&[ALPN_UPSTREAM]).unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();

    // A relay with a leaf from the same CA gets in, and the origin sees its
    // certificate.
    let relay = dev(&dir);
    let (client, accepted) = tokio::join!(
        connect(&relay, &[ALPN_UPSTREAM], addr, "localhost"),
        accept(&endpoint)
    );
    client.unwrap();
    let accepted = accepted.unwrap();
    let chain = accepted
        .peer_identity()
        .expect("client certificate")
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .unwrap();
    assert_eq!(chain.len(), 1);

    // A client with no certificate of its own (trusting the right CA) is
    // refused by the server.
    let ca_path = dir.path().join("ca.pem");
    let anonymous = Trust::Files {
        cert: None,
        key: None,
        ca: Some(ca_path),
    }
    .load()
    .unwrap();
    assert!(!anonymous.has_identity());
    let (client, accepted) = tokio::join!(
        async {
            let conn = connect(&anonymous, &[ALPN_UPSTREAM], addr, "localhost").await?;
            // TLS 1.3 clients finish before the server has checked their
            // (missing) certificate: the refusal arrives as a close.
            Err::<(), _>(within("close", conn.closed()).await)
        },
        accept(&endpoint)
    );
    assert!(client.is_err());
    assert!(
        accepted.is_err(),
        "the server must refuse a client without certificate"
    );

    // A client whose leaf comes from another CA is refused too.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = Pki::make(&foreign_dir, &["localhost"]);
    let foreign = Trust::Files {
        cert: Some(foreign.cert),
        key: Some(foreign.key),
        ca: Some(dir.path().join("ca.pem")),
    }
    .load()
    .unwrap();
    let (client, accepted) = tokio::join!(
        async {
            let conn = connect(&foreign, &[ALPN_UPSTREAM], addr, "localhost").await?;
            Err::<(), _>(within("close", conn.closed()).await)
        },
        accept(&endpoint)
    );
    assert!(client.is_err());
    assert!(
        accepted.is_err(),
        "the server must refuse a client of another CA"
    );
}

/// A production-style PKI made with rcgen: a CA and one leaf, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn make(dir: &tempfile::TempDir, names: &[&str]) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test production CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut leaf_params = CertificateParams::new(names).unwrap();
        leaf_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

        let pki = Pki {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        fs::write(&pki.ca, ca_cert.pem()).unwrap();
        fs::write(&pki.cert, leaf.pem()).unwrap();
        fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
        pki
    }
}

#[tokio::test]
async fn certificates_from_files_work_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(&dir, &["relay.statecast.test"]);
    let server_trust = Trust::from_flags(
        Some(pki.cert.clone()),
        Some(pki.key.clone()),
        Some(pki.ca.clone()),
        None,
    );
    assert!(
        server_trust.describe().starts_with("certificates from "),
        "{}",
        server_trust.describe()
    );
    let server_tls = server_trust.load().unwrap();
    let client_tls = Trust::from_flags(None, None, Some(pki.ca.clone()), None)
        .load()
        .unwrap();
    // A client with only a CA cannot serve.
    assert!(matches!(
        client_tls.server_config(&[ALPN_CLIENT]),
        Err(TlsError::NoIdentity)
    ));
    // A server with no CA cannot connect out.
    let server_only = Trust::from_flags(Some(pki.cert.clone()), Some(pki.key.clone()), None, None)
        .load()
        .unwrap();
    assert!(matches!(
        server_only.client_config(&[ALPN_CLIENT]),
        Err(TlsError::NoRoots)
    ));

    let (endpoint, addr) = server(&server_tls, &[ALPN_CLIENT]);
    let (client, accepted) = tokio::join!(
        connect(&client_tls, &[ALPN_CLIENT], addr, "relay.statecast.test"),
        accept(&endpoint)
    );
    client.unwrap();
    accepted.unwrap();
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Trust::from_flags(None, None, Some(dir.path().join("nope.pem")), None)
        .load()
        .unwrap_err();
    assert!(missing.to_string().contains("nope.pem"), "{missing}");

    let empty = dir.path().join("empty.pem");
    fs::write(&empty, "not a certificate\n").unwrap();
    let err = Trust::from_flags(None, None, Some(empty), None)
        .load()
        .unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");

    let pki = Pki::make(&dir, &["localhost"]);
    let err = Trust::from_flags(Some(pki.cert), None, None, None)
        .load()
        .unwrap_err();
    assert!(matches!(err, TlsError::IncompleteIdentity), "{err}");
}
