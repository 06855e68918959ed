//! Pages as a person sees them: Debian's Chromium, headless, rendering a page to its DOM (or
//! a screenshot), and picking elements out of the DOM; and the console's own browser scripts
//! (`server/console/e2e/`), which drive Chromium with playwright-core to click through it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::wait_for;

/// Chromium run as the environment notes say: headless, no sandbox (root), no background
/// network traffic (the machine's network is closed), a fresh profile.
pub fn chromium(dir: &Path, args: &[&str]) -> std::process::Output {
    let exe = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium is installed (tests/run.sh installs Debian's chromium)");
    let profile = tempfile::tempdir_in(dir).unwrap();
    Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .expect("running chromium")
}

/// The rendered DOM of `url` once it holds `marker` (the console draws its pages from the
/// API's answers, so a page is ready when what the test looks for has arrived).
pub fn rendered(dir: &Path, url: &str, marker: &str) -> String {
    wait_for(
        &format!("{url} to show {marker}"),
        Duration::from_secs(60),
        || {
            let out = chromium(dir, &["--dump-dom", url]);
            let dom = String::from_utf8_lossy(&out.stdout).into_owned();
            dom.contains(marker).then_some(dom)
        },
    )
}

/// The workspace's top folder.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Runs the console's browser script `server/console/e2e/<script>` with Node.js and `env`
/// (at most `limit`), its npm packages installed first by `server/console/build.sh --deps`.
/// Returns what it printed; panics with it when the script fails.
pub fn console_script(script: &str, env: &[(&str, String)], limit: Duration) -> String {
    let root = workspace();
    static DEPS: std::sync::Once = std::sync::Once::new();
    DEPS.call_once(|| {
        let status = Command::new("bash")
            .arg(root.join("server/console/build.sh"))
            .arg("--deps")
            .status()
            .expect("bash");
        assert!(status.success(), "installing the console's npm packages");
    });
    let out = Command::new("timeout")
        .arg(limit.as_secs().to_string())
        .arg("node")
        .arg(root.join("server/console/e2e").join(script))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("node (Node.js is on the machine; see server/console/README.md)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{text}",
        out.status
    );
    text
}

/// The element `<tag … {attr}="{value}"…>…</tag>`, nested elements of the same tag included.
pub fn element<'a>(dom: &'a str, tag: &str, attr: &str, value: &str) -> &'a str {
    let open = format!("{attr}=\"{value}\"");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no {open} in the page"));
    let start = dom[..at].rfind(&format!("<{tag}")).expect("opening tag");
    let (opening, closing) = (format!("<{tag}"), format!("</{tag}>"));
    let mut depth = 0;
    let mut i = start;
    while i < dom.len() {
        if dom[i..].starts_with(&opening) {
            depth += 1;
            i += opening.len();
        } else if dom[i..].starts_with(&closing) {
            depth -= 1;
            i += closing.len();
            if depth == 0 {
                return &dom[start..i];
            }
        } else {
            i += dom[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    panic!("unclosed <{tag}> for {open}");
}
