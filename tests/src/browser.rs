//! Pages as a person sees them: Debian's Chromium, headless, rendering a page to its DOM (or
//! a screenshot), and picking elements out of the DOM.

use std::path::Path;
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

/// The rendered DOM of `url`, once the page has loaded its data.
pub fn rendered(dir: &Path, url: &str) -> String {
    wait_for("the dashboard to render", Duration::from_secs(60), || {
        let out = chromium(dir, &["--dump-dom", url]);
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        dom.contains("data-loaded=\"1\"").then_some(dom)
    })
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
