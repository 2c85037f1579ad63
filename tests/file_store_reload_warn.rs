//! A refused key file reload is a `tracing` warn event with the error's line and column, and
//! never the secret. Its own test binary: a callsite first hit on another test's thread, with
//! no subscriber there, could otherwise be cached as uninteresting.
#![cfg(all(feature = "file-store", feature = "tracing"))]

use std::io::Write;

use tower_llm_policy::keys::{FileKeyStore, KeyDigest, KeyStore};

const RESTRICTED: &str = "[[keys]]
name = \"chat-app\"
secret = \"sk-chat-app-5e1f9a\"
model_limits_enabled = true
model_limits = [\"gpt-4o-mini\"]
";

#[test]
fn a_refused_reload_is_a_warn_event_without_the_secret() -> Result<(), Box<dyn std::error::Error>> {
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::util::SubscriberInitExt;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let _tracing = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .set_default();

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, RESTRICTED)?;
    let store = FileKeyStore::open(&path)?.check_interval(std::time::Duration::ZERO);
    // A syntax error on the secret's line.
    std::fs::write(
        &path,
        RESTRICTED
            .replace("\"sk-chat-app-5e1f9a\"", "\"sk-chat-app-5e1f9a")
            .as_bytes(),
    )?;
    assert!(!store.refresh());
    let key = store.lookup_now(&KeyDigest::of("sk-chat-app-5e1f9a"));
    assert!(matches!(key, Some(Ok(Some(_)))), "the old key is gone");

    let log = String::from_utf8(buffer.0.lock().unwrap().clone())?;
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains("key file reload refused"), "{log}");
    assert!(log.contains("line 3, column"), "{log}");
    assert!(log.contains("failed_reloads=1"), "{log}");
    assert!(!log.contains("5e1f9a"), "secret leaked: {log}");
    Ok(())
}
