//! The live admin page in a real browser (Debian's headless `chromium`): it loads without a
//! console error, shows the running config's variants, and follows traffic and config edits.
//!
//! `ABPROXY_SCREENSHOTS=1 cargo test --test admin_ui` also runs traffic for longer and
//! writes the README's screenshots to docs/.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::browser::Browser;
use support::proxy::{eventually, sample};
use support::{variants, Backend, Client, Edit, Model, Proxy};

/// Longest wait for anything the page should show; it polls every second.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_variants_their_traffic_the_shadow_and_the_canary() {
    let control = Backend::slow("control", Duration::from_millis(2)).await;
    let mut flaky = Model::failing_one_in(20);
    flaky.delay = Duration::from_millis(6);
    let treatment = Backend::model("treatment", flaky).await;
    let candidate = Backend::predicting("candidate", 0.5).await;
    let config = format!(
        "{}[[shadow]]\nname = \"candidate\"\nupstream = \"{}\"\ncompare = \"/prediction\"\n\n\
         [canary]\nvariant = \"treatment\"\nbaseline = \"control\"\ninterval = \"1s\"\n\
         min_requests = 20\nfailures_to_rollback = 1000\n\
         [canary.checks]\nmax_error_rate = 0.1\nmax_p99 = \"250ms\"\n",
        variants(&[("control", &control, 70.0), ("treatment", &treatment, 30.0)]),
        candidate.url()
    );
    let proxy = Proxy::start(&config).await;
    let browser = Browser::launch(1280, 900).await;
    browser.goto(&page(&proxy)).await;

    wait_for_rows(&browser, &[("control", 70), ("treatment", 30)]).await;
    assert_eq!(
        browser.eval(&text_of("control", "buckets")).await,
        "0–69 (70 of 100)"
    );
    assert_eq!(browser.eval(&value_of("control", "requests")).await, 0.0);

    let traffic = Traffic::start(&proxy, 2);
    browser
        .wait_for(
            "requests to control are counted",
            &format!("{} > 0", value_of("control", "requests")),
            WAIT,
        )
        .await;
    let counted = browser.eval(&value_of("control", "requests")).await;
    browser
        .wait_for(
            "the count grows while traffic flows",
            &format!("{} > {counted}", value_of("control", "requests")),
            WAIT,
        )
        .await;
    for variant in ["control", "treatment"] {
        browser
            .wait_for(
                &format!("{variant}'s request rate is shown"),
                &format!("{} > 0", value_of(variant, "rate")),
                WAIT,
            )
            .await;
        browser
            .wait_for(
                &format!("{variant}'s p99 is shown"),
                &format!("{} > 0", value_of(variant, "p99")),
                WAIT,
            )
            .await;
    }
    browser
        .wait_for(
            "treatment's failures (1 in 20) show in its error ratio",
            &format!("{} > 0", value_of("treatment", "errors")),
            WAIT,
        )
        .await;
    assert_eq!(browser.eval(&value_of("control", "errors")).await, 0.0);
    browser
        .wait_for(
            "the canary's state and an analysis are shown",
            "document.querySelector('#canary [data-field=state]')?.textContent === 'running' \
             && document.querySelectorAll('#canary details').length > 0",
            WAIT,
        )
        .await;
    browser
        .wait_for(
            "the shadow's agreement is shown",
            "document.querySelector('[data-shadow=candidate] [data-field=agreement]')?.dataset.value",
            WAIT,
        )
        .await;
    for chart in ["rate", "errors", "p99"] {
        browser
            .wait_for(
                &format!("the {chart} chart has a line per variant"),
                &format!("document.querySelectorAll('[data-chart={chart}] polyline').length >= 2"),
                WAIT,
            )
            .await;
    }

    let screenshots = std::env::var_os("ABPROXY_SCREENSHOTS").is_some();
    if screenshots {
        // Enough history for the charts to say something.
        tokio::time::sleep(Duration::from_secs(90)).await;
    }
    let desktop = browser.screenshot().await;
    browser.viewport(390, 844, true).await;
    next_poll(&browser).await;
    let overflow = browser
        .eval("document.documentElement.scrollWidth - window.innerWidth")
        .await;
    assert_eq!(
        overflow, 0,
        "on a 390 px phone screen the page scrolls sideways by {overflow} px"
    );
    let phone = browser.screenshot().await;
    for png in [&desktop, &phone] {
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG screenshot");
    }
    if screenshots {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).expect("docs/");
        std::fs::write(docs.join("admin-page.png"), &desktop).expect("screenshot written");
        std::fs::write(docs.join("admin-page-phone.png"), &phone).expect("screenshot written");
    }

    traffic.stop().await;
    // What the page counted is what /metrics says, once the last answers are recorded.
    eventually(WAIT, || async {
        let metrics = proxy.metrics().await;
        let mut same = true;
        for variant in ["control", "treatment"] {
            let total = sample(&metrics, "abproxy_requests_total", &[("variant", variant)]);
            same &= browser.eval(&value_of(variant, "requests")).await == total;
        }
        same
    })
    .await;
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_config_edits_and_shows_a_rejected_one() {
    let control = Backend::start("control").await;
    let treatment = Backend::start("treatment").await;
    let challenger = Backend::start("challenger").await;
    let proxy = Proxy::start(&variants(&[
        ("control", &control, 50.0),
        ("treatment", &treatment, 50.0),
    ]))
    .await;
    let browser = Browser::launch(1280, 900).await;
    browser.goto(&page(&proxy)).await;
    wait_for_rows(&browser, &[("control", 50), ("treatment", 50)]).await;
    assert_eq!(browser.eval("document.body.dataset.generation").await, "1");

    // A weight change, a renamed variant and a new one, in one edit.
    proxy.edit_config(
        &variants(&[
            ("control", &control, 60.0),
            ("treatment-v2", &treatment, 20.0),
            ("challenger", &challenger, 20.0),
        ]),
        Edit::Rename,
    );
    wait_for_rows(
        &browser,
        &[("control", 60), ("treatment-v2", 20), ("challenger", 20)],
    )
    .await;
    assert_eq!(browser.eval("document.body.dataset.generation").await, "2");
    assert_eq!(
        browser.eval(&text_of("challenger", "buckets")).await,
        "80–99 (20 of 100)"
    );
    let no_error = browser
        .eval("document.querySelector('[data-field=\"reload-error\"]').textContent")
        .await;
    assert_eq!(no_error, "No rejected reload.");

    proxy.edit_config(
        &variants(&[
            ("control", &control, 60.0),
            ("challenger", &challenger, 30.0),
        ]),
        Edit::Rename,
    );
    let shown = browser
        .wait_for(
            "the rejected reload and its reason are shown",
            "(t => t.includes('Last reload rejected') && t)(document.querySelector('[data-field=\"reload-error\"]').textContent)",
            WAIT,
        )
        .await;
    assert!(
        shown.as_str().is_some_and(|t| t.contains("sum to 100")),
        "{shown}"
    );
    // The last good config keeps serving, and the page keeps showing it.
    wait_for_rows(
        &browser,
        &[("control", 60), ("treatment-v2", 20), ("challenger", 20)],
    )
    .await;
    assert_eq!(browser.eval("document.body.dataset.generation").await, "2");
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");
}

/// The check of the two tests above can fail: an error on the page is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_errors_on_the_page_are_caught() {
    let control = Backend::start("control").await;
    let proxy = Proxy::start(&variants(&[("control", &control, 100.0)])).await;
    let browser = Browser::launch(800, 600).await;
    browser.goto(&page(&proxy)).await;
    wait_for_rows(&browser, &[("control", 100)]).await;
    assert_eq!(browser.errors(), Vec::<String>::new());
    browser
        .eval(
            "console.error('probe: logged'); setTimeout(() => { throw new Error('probe: thrown'); }); \
             fetch('/no-such-page').then(() => {}); true",
        )
        .await;
    let deadline = std::time::Instant::now() + WAIT;
    while browser.errors().len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let errors = browser.errors().join("\n");
    for expected in ["probe: logged", "probe: thrown", "404"] {
        assert!(
            errors.contains(expected),
            "{expected:?} not among the reported errors:\n{errors}"
        );
    }
}

fn page(proxy: &Proxy) -> String {
    format!("http://{}/", proxy.admin_addr)
}

/// JavaScript for a variant row's cell, as a number (its `data-value`), or null.
fn value_of(variant: &str, field: &str) -> String {
    format!(
        "(cell => cell && cell.dataset.value !== '' ? Number(cell.dataset.value) : null)\
         (document.querySelector('#variants tr[data-variant=\"{variant}\"] [data-field=\"{field}\"]'))"
    )
}

/// JavaScript for a variant row's cell, as shown.
fn text_of(variant: &str, field: &str) -> String {
    format!(
        "document.querySelector('#variants tr[data-variant=\"{variant}\"] [data-field=\"{field}\"]')?.textContent"
    )
}

/// Waits until the variants table lists exactly these variants and weights, in order.
async fn wait_for_rows(browser: &Browser, rows: &[(&str, u32)]) {
    let expected = json!(rows).to_string();
    browser
        .wait_for(
            &format!("the page lists {expected}"),
            &format!(
                "JSON.stringify([...document.querySelectorAll('#variants tbody tr[data-variant]')]\
                 .filter(row => row.dataset.variant !== 'none')\
                 .map(row => [row.dataset.variant, Number(row.querySelector('[data-field=weight]').dataset.value)])) \
                 === {}",
                json!(expected)
            ),
            WAIT,
        )
        .await;
}

/// Waits until the page has read the admin port twice more, so what it shows is fresh.
async fn next_poll(browser: &Browser) {
    let polls = browser.eval("Number(document.body.dataset.polls)").await;
    let polls = polls.as_f64().unwrap_or(0.0);
    browser
        .wait_for(
            "the page polls again",
            &format!("Number(document.body.dataset.polls) >= {}", polls + 2.0),
            WAIT,
        )
        .await;
}

/// Clients sending requests as distinct users, at a rate that rises and falls over a minute
/// (so the charts have a shape), until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(proxy: &Proxy, clients: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let started = std::time::Instant::now();
        let tasks = (0..clients)
            .map(|client| {
                let (http, stop) = (Client::new(proxy.addr), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let _ = http
                            .get("/predict")
                            .user(&format!("user-{client}-{n}"))
                            .try_send()
                            .await;
                        let phase = started.elapsed().as_secs_f64() / 60.0 * std::f64::consts::TAU;
                        let pause = 6.0 + 4.0 * phase.sin();
                        tokio::time::sleep(Duration::from_secs_f64(pause / 1000.0)).await;
                    }
                })
            })
            .collect();
        Traffic { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("traffic task");
        }
    }
}
