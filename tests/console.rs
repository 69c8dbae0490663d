//! The console in a real browser: headless Chromium, driven over WebDriver, against a real
//! `sync-control` and a real `sync-gateway` registered with it, with the real `sync-agent`
//! replicating. An operator's path through the page: see the gateway online, assign a disk and
//! copy its key, watch it replicate, click cutover, see the launch appear.
//!
//! Also a test of the WebDriver client itself against a page served from the test.
//!
//! Needs `chromium` and `chromium-driver` (Debian); `scripts/test` installs them.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;
#[path = "common/control.rs"]
mod control;
#[path = "common/webdriver.rs"]
mod webdriver;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use control::ControlPlane;
use webdriver::{require_browser, Browser, WdResult};

// ---------------------------------------------------------------------------------------------
// The WebDriver client against a page of our own

const CLIENT_PAGE: &str = r#"<!doctype html>
<html><head><title>webdriver client test</title></head>
<body>
  <p id="out">before</p>
  <button id="go" onclick="document.getElementById('out').textContent = 'clicked ' + (++window.n)">go</button>
  <input id="name">
  <button id="greet" onclick="document.getElementById('out').textContent = 'hello ' + document.getElementById('name').value">greet</button>
  <button id="ask" onclick="document.getElementById('out').textContent = confirm('really?') ? 'confirmed' : 'cancelled'">ask</button>
  <button id="late" onclick="setTimeout(function () { var d = document.createElement('div'); d.id = 'later'; d.textContent = 'arrived'; document.body.appendChild(d); }, 700)">late</button>
  <script>window.n = 0;</script>
</body></html>
"#;

/// Serves `page` for every request on a loopback port until the test process ends.
fn serve_page(page: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                // request line and headers; the page ignores what was asked for
                while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
            });
        }
    });
    format!("http://{addr}/")
}

#[test]
fn webdriver_client_clicks_and_reads() {
    let _serial = serial();
    let t = TestDir::new("webdriver");
    let url = serve_page(CLIENT_PAGE);
    let mut b = Browser::start(&t.root);
    b.screenshot_on_failure(&t.path("failure.png"));
    let long = Duration::from_secs(30);

    b.navigate(&url).unwrap();
    assert_eq!(b.current_url().unwrap(), url);
    let out = b.find("#out").unwrap();
    assert_eq!(b.text(&out).unwrap(), "before");

    // click, twice: the page's own state moves
    let go = b.find("button#go").unwrap();
    b.click(&go).unwrap();
    b.wait_for_text("#out", long, |t| t == "clicked 1").unwrap();
    b.click(&go).unwrap();
    b.wait_for_text("#out", long, |t| t == "clicked 2").unwrap();

    // typing, read back as a property and through the page
    let name = b.find("input#name").unwrap();
    b.send_keys(&name, "web-1").unwrap();
    assert_eq!(b.property(&name, "value").unwrap(), "web-1");
    b.click(&b.find("#greet").unwrap()).unwrap();
    b.wait_for_text("#out", long, |t| t == "hello web-1")
        .unwrap();
    b.clear(&name).unwrap();
    assert_eq!(b.property(&name, "value").unwrap(), "");

    // window.confirm, accepted and dismissed
    b.click(&b.find("#ask").unwrap()).unwrap();
    assert_eq!(b.accept_alert().unwrap(), "really?");
    b.wait_for_text("#out", long, |t| t == "confirmed").unwrap();
    b.click(&b.find("#ask").unwrap()).unwrap();
    // a command while the prompt is open fails and leaves it open
    let blocked = b.find("body").unwrap_err();
    assert_eq!(blocked.code, "unexpected alert open", "{blocked}");
    b.dismiss_alert().unwrap();
    b.wait_for_text("#out", long, |t| t == "cancelled").unwrap();

    // errors name the WebDriver error; waits see elements that appear later
    let missing = b.find("#nothing-here").unwrap_err();
    assert_eq!(missing.code, "no such element", "{missing}");
    assert!(missing.to_string().contains("no such element"), "{missing}");
    let short = b
        .wait_for_text("#out", Duration::from_millis(600), |t| t == "never")
        .unwrap_err();
    assert!(short.to_string().contains("cancelled"), "{short}");
    b.click(&b.find("#late").unwrap()).unwrap();
    assert_eq!(
        b.wait_for_text("#later", long, |t| !t.is_empty()).unwrap(),
        "arrived"
    );
    assert_eq!(b.find_all("button").unwrap().len(), 4);
    assert_eq!(
        b.execute("return arguments[0] + window.n;", &[serde_json::json!(40)])
            .unwrap(),
        42
    );

    let shot = t.path("client.png");
    b.save_screenshot(&shot).unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {}",
        shot.display()
    );
    eprintln!("screenshot: {} ({} bytes)", shot.display(), png.len());
}

// ---------------------------------------------------------------------------------------------
// The operator's path through the console

/// Polls `f` until it yields `Some`; element churn (the page re-renders on every refresh) is
/// retried, any other WebDriver error fails the test at once.
#[track_caller]
fn wait_in_page<T>(
    b: &Browser,
    within: Duration,
    what: &str,
    mut f: impl FnMut(&Browser) -> WdResult<Option<T>>,
) -> T {
    let end = Instant::now() + within;
    let mut last = String::new();
    loop {
        match f(b) {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) if e.is_transient() => last = e.to_string(),
            Err(e) => panic!("waiting for {what}: {e}"),
        }
        assert!(
            Instant::now() < end,
            "timed out after {within:?} waiting for {what} (last transient error: {last:?})"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The `.kind`, `.state` and id of every launch row.
fn launches(b: &Browser) -> WdResult<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    for row in b.find_all("tr[data-instance-id]")? {
        let id = b.attribute(&row, "data-instance-id")?.unwrap_or_default();
        let kind = b.text(&b.find_in(&row, ".kind")?)?;
        let state = b.text(&b.find_in(&row, ".state")?)?;
        out.push((id, kind, state));
    }
    Ok(out)
}

#[test]
fn console_assign_replicate_cutover_in_a_browser() {
    let _serial = serial();
    require_browser();
    let t = TestDir::new("console");
    // Generous: the gateway reports every second, but the machine has two cores and the other
    // test binaries run meanwhile.
    let long = Duration::from_secs(120);

    // reports asked of the gateway every second, so the page follows replication closely
    let cp = ControlPlane::start_in(&t.path("control"), &["--report-interval-secs", "1"]);
    let token_file = t.path("bootstrap.token");
    let bootstrap = cp.cli_ok(&["gateway", "bootstrap-token"]);
    std::fs::write(&token_file, format!("{}\n", bootstrap.trim())).unwrap();
    let config = GatewayConfig::new(t.data_dir()).extra_toml(&format!(
        "[control_plane]\nurl = \"http://{}\"\nbootstrap_token_file = \"{}\"\nreport_interval_secs = 1",
        cp.addr,
        token_file.display()
    ));
    let gw = Gateway::start(&config, &t.path("gateway.toml"), &t.path("gateway.log"));

    let mut b = Browser::start(&t.root);
    b.screenshot_on_failure(&t.path("failure.png"));

    // Log in through the URL fragment; the gateway shows up online.
    b.navigate(&format!("http://{}/#token={}", cp.addr, cp.token))
        .unwrap();
    b.wait_for_element("#app", long).unwrap();
    b.wait_for_text("tr[data-gateway-id] .online", long, |t| t == "online")
        .unwrap();
    let row = b.find("tr[data-gateway-id]").unwrap();
    let gateway_id = b.attribute(&row, "data-gateway-id").unwrap().unwrap();
    eprintln!("gateway {gateway_id} online in the console");

    // Assign a disk through the form and take its agent key from the page.
    let size = 16 * MIB;
    let src = t.source_path("web-1");
    make_image(&src, size, 1729);
    let option = b
        .wait_for_element(
            &format!("select#assign-gateway option[value=\"{gateway_id}\"]"),
            long,
        )
        .unwrap();
    b.click(&option).unwrap();
    let select = b.find("select#assign-gateway").unwrap();
    assert_eq!(b.property(&select, "value").unwrap(), gateway_id.as_str());
    let disk_id = b.find("input#assign-disk-id").unwrap();
    b.clear(&disk_id).unwrap();
    b.send_keys(&disk_id, "web-1").unwrap();
    let size_input = b.find("input#assign-size").unwrap();
    b.clear(&size_input).unwrap();
    b.send_keys(&size_input, &size.to_string()).unwrap();
    b.click(&b.find("button#assign").unwrap()).unwrap();
    let is_key = |t: &str| t.len() == 64 && t.bytes().all(|c| c.is_ascii_hexdigit());
    let key = b.wait_for_text("#agent-key", long, is_key).unwrap();
    let key_file = t.key_path("web-1");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    b.wait_for_element("tr[data-disk-id=\"web-1\"]", long)
        .unwrap();

    // The real agent replicates. The assignment reaches the gateway on its next command poll,
    // so the agent may meet an `unknown_disk` first: run it again until the disk is there.
    let agent = AgentCmd::new(gw.addr, "web-1", &key_file, &t.state_dir("web-1"), &src);
    let run = wait_for(long, "the gateway to accept web-1's agent", || {
        let run = agent.run(Duration::from_secs(180));
        if !run.status.success() && run.stderr.contains("unknown_disk") {
            std::thread::sleep(Duration::from_millis(500));
            return None;
        }
        Some(run)
    });
    run.expect_verified();
    run.note("web-1 full sync");

    let disk = "tr[data-disk-id=\"web-1\"]";
    b.wait_for_text(&format!("{disk} .state"), long, |t| t == "continuous")
        .unwrap();
    let snapshot = b
        .wait_for_text(&format!("{disk} .last-snapshot"), long, |t| {
            !t.is_empty() && t != "-"
        })
        .unwrap();
    eprintln!("web-1 continuous, last snapshot {snapshot:?}");

    // Cutover: confirm, and the launch appears running.
    let cutover = b
        .find(&format!("{disk} button[data-action=\"cutover\"]"))
        .unwrap();
    b.click(&cutover).unwrap();
    let question = b.accept_alert().unwrap();
    eprintln!("confirmed: {question:?}");
    let instance = wait_in_page(&b, long, "a running cutover launch", |b| {
        Ok(launches(b)?
            .into_iter()
            .find(|(_, kind, state)| kind == "cutover" && state == "running")
            .map(|(id, _, _)| id))
    });
    let launch_disks = b
        .text(
            &b.find(&format!("tr[data-instance-id=\"{instance}\"] .disks"))
                .unwrap(),
        )
        .unwrap();
    assert!(
        launch_disks.contains("web-1"),
        "launch disks: {launch_disks:?}"
    );
    eprintln!("cutover launched instance {instance}");

    let launched = gw
        .data_dir
        .join("instances")
        .join(&instance)
        .join("web-1.img");
    assert!(launched.exists(), "no {}", launched.display());
    assert_same_file(&launched, &src, "the cutover instance's disk");

    // A picture of the end state, kept outside the test's temp dir (removed on success).
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-cutover.png");
    b.save_full_page_screenshot(&shot).unwrap();
    eprintln!("screenshot: {}", shot.display());
}
