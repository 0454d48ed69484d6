//! The development CA in a data directory: created once, shared by everyone
//! who starts at the same time, kept private.

use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{ServerName, UnixTime};
use statecast_transport::tls::{DEV_CA_CERT_FILE, DEV_CA_KEY_FILE, crypto_provider};
use statecast_transport::{DevCa, TlsConfig, TlsError, Trust};

/// Checks that `tls`'s leaf chains to the CA in `roots_of` for each of the
/// default names.
fn assert_chains_to(tls: &TlsConfig, roots_of: &TlsConfig) {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots_of.roots(), crypto_provider())
        .build()
        .unwrap();
    let chain = tls.certificate_chain();
    for name in ["localhost", "127.0.0.1", "::1"] {
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(name).unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("leaf for {name} does not chain to the CA: {e}"));
    }
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn concurrent_creation_ends_with_one_ca() {
    const STARTERS: usize = 8;
    for round in 0..5 {
        let parent = tempfile::tempdir().unwrap();
        // The directory does not exist yet: creating it races too.
        let dir = parent.path().join("data").join("statecast");
        let barrier = Arc::new(Barrier::new(STARTERS));
        let handles: Vec<_> = (0..STARTERS)
            .map(|_| {
                let dir = dir.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    Trust::dev(dir).load()
                })
            })
            .collect();
        let configs: Vec<TlsConfig> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();

        // One CA on disk, and every starter trusts exactly it.
        let on_disk = Trust::dev(&dir).load().unwrap();
        for tls in &configs {
            assert_eq!(
                tls.ca_certificates(),
                on_disk.ca_certificates(),
                "round {round}"
            );
        }
        // Every starter's leaf chains to it.
        for tls in &configs {
            assert_chains_to(tls, &on_disk);
        }
        // Each starter has its own leaf.
        assert_ne!(
            configs[0].certificate_chain(),
            configs[1].certificate_chain()
        );
        // No temporary files are left behind.
        assert_eq!(
            file_names(&dir),
            vec![DEV_CA_KEY_FILE.to_owned(), DEV_CA_CERT_FILE.to_owned()],
            "round {round}"
        );
    }
}

/// Set in child processes of [`processes_race_to_create_one_ca`].
const CHILD_DIR_ENV: &str = "STATECAST_TRANSPORT_TEST_CA_DIR";

/// Run as a child process: loads the development CA in the directory the
/// parent names and prints its certificate. Does nothing when run directly.
#[test]
fn dev_ca_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let tls = Trust::dev(dir).load().unwrap();
    let ca: String = tls.ca_certificates()[0]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("CA={ca}");
}

#[test]
fn processes_race_to_create_one_ca() {
    const PROCESSES: usize = 4;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("shared");
    let exe = std::env::current_exe().unwrap();
    // Start them all before waiting for any.
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["dev_ca_child", "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_DIR_ENV, &dir)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut seen = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ca = stdout
            .lines()
            // libtest may print "test dev_ca_child ... " on the same line.
            .find_map(|l| l.split_once("CA=").map(|(_, ca)| ca.trim()))
            .unwrap_or_else(|| panic!("child printed no CA: {stdout}"))
            .to_owned();
        seen.push(ca);
    }
    let on_disk = DevCa::open(&dir).unwrap();
    let expected: String = on_disk
        .certificate()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for ca in &seen {
        assert_eq!(ca, &expected, "every process must use the CA on disk");
    }
    assert_eq!(
        file_names(&dir),
        vec![DEV_CA_KEY_FILE.to_owned(), DEV_CA_CERT_FILE.to_owned()]
    );
}

#[test]
fn the_ca_persists_and_ca_pem_matches_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = DevCa::open(dir.path()).unwrap();
    let second = DevCa::open(dir.path()).unwrap();
    assert_eq!(first.certificate(), second.certificate());

    let pem = fs::read(dir.path().join(DEV_CA_CERT_FILE)).unwrap();
    let from_file = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(from_file, vec![first.certificate().clone()]);

    // A lost ca.pem is written again from the key bundle.
    fs::remove_file(dir.path().join(DEV_CA_CERT_FILE)).unwrap();
    let third = DevCa::open(dir.path()).unwrap();
    assert_eq!(third.certificate(), first.certificate());
    assert_eq!(fs::read(dir.path().join(DEV_CA_CERT_FILE)).unwrap(), pem);
}

#[cfg(unix)]
#[test]
fn keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("fresh");
    Trust::dev(&dir).load().unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join(DEV_CA_KEY_FILE)), 0o600);
    // The directory this created holds keys: nobody else may list it.
    assert_eq!(mode(&dir) & 0o077, 0);
    // The public certificate may be world-readable, never writable.
    assert_eq!(mode(&dir.join(DEV_CA_CERT_FILE)) & 0o022, 0);
}

#[test]
fn a_damaged_bundle_is_reported_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    DevCa::open(dir.path()).unwrap();
    let bundle = dir.path().join(DEV_CA_KEY_FILE);
    let text = fs::read_to_string(&bundle).unwrap();
    // Keep the key, drop the certificate.
    let key_only = &text[..text.find("-----BEGIN CERTIFICATE-----").unwrap()];
    fs::write(&bundle, key_only).unwrap();
    let err = DevCa::open(dir.path()).unwrap_err();
    assert!(matches!(err, TlsError::CorruptDevCa { .. }), "{err}");
    assert!(err.to_string().contains(DEV_CA_KEY_FILE), "{err}");
    // The damaged file is left for a person to look at.
    assert_eq!(fs::read_to_string(&bundle).unwrap(), key_only);

    // A certificate that belongs to another key is refused too.
    let other = tempfile::tempdir().unwrap();
    DevCa::open(other.path()).unwrap();
    let other_text = fs::read_to_string(other.path().join(DEV_CA_KEY_FILE)).unwrap();
    let other_cert = &other_text[other_text.find("-----BEGIN CERTIFICATE-----").unwrap()..];
    fs::write(&bundle, format!("{key_only}{other_cert}")).unwrap();
    let err = DevCa::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
}

#[test]
fn describe_names_the_dev_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let trust = Trust::dev(dir.path());
    let tls = trust.load().unwrap();
    let expected = format!(
        "development CA at {} (self-made, local only)",
        dir.path().join("ca.pem").display()
    );
    assert_eq!(trust.describe(), expected);
    assert_eq!(tls.describe(), expected);
}

#[test]
fn a_bad_extra_name_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Trust::dev(dir.path())
        .with_names(["caf\u{e9}.example"])
        .load()
        .unwrap_err();
    assert!(matches!(err, TlsError::Generate(_)), "{err}");
}
