//! Debian's `chromium`, headless, driven over the DevTools protocol: a real browser runs a
//! page's scripts, and everything its console reports is kept, so a test can fail on an
//! error that no HTTP assertion would see.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// Longest wait for chromium to start, or to answer one command.
const STARTUP: Duration = Duration::from_secs(30);
const COMMAND: Duration = Duration::from_secs(30);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A headless chromium with one page open. Killed (with its renderer processes) on drop.
pub struct Browser {
    process: ProcessGroup,
    _profile: tempfile::TempDir,
    commands: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next_id: AtomicU64,
    session: String,
    /// Console errors, uncaught exceptions and failed loads, as chromium reported them.
    errors: Arc<Mutex<Vec<String>>>,
}

/// Chromium's process group: the browser and the renderer and GPU processes it starts.
struct ProcessGroup(Child);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // The group has the browser's pid as its id (`process_group(0)`), so this ends only
        // the processes this test started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Browser {
    /// Starts chromium with a fresh profile and opens a blank page in a `width`×`height`
    /// window.
    pub async fn launch(width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                // Tests run as root in CI, where chromium's sandbox cannot start; the only page
                // loaded is the one under test.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--force-color-profile=srgb",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("chromium is installed (Debian package `chromium`; .ci/run installs it)");
        let stderr = child.stderr.take().expect("stderr");
        let process = ProcessGroup(child);
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut url_tx = Some(url_tx);
            let mut log = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = url_tx.take() {
                        let _ = tx.send(Ok(url.trim().to_owned()));
                    }
                } else if url_tx.is_some() {
                    log.push(line);
                }
            }
            // Chromium exited before it listened: say what it printed.
            if let Some(tx) = url_tx {
                let _ = tx.send(Err(log.join("\n")));
            }
        });
        let url = match tokio::task::spawn_blocking(move || url_rx.recv_timeout(STARTUP))
            .await
            .expect("waiting for chromium")
        {
            Ok(Ok(url)) => url,
            Ok(Err(log)) => panic!("chromium exited before listening:\n{log}"),
            Err(_) => panic!("chromium did not listen within {STARTUP:?}"),
        };
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("DevTools websocket");
        let (mut sink, mut stream) = socket.split();
        let (commands, mut outgoing) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(message) = outgoing.recv().await {
                if sink.send(message).await.is_err() {
                    return;
                }
            }
        });
        let pending = Pending::default();
        let errors = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn({
            let (pending, errors) = (pending.clone(), errors.clone());
            async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let Ok(message) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if let Some(id) = message["id"].as_u64() {
                        if let Some(reply) = pending.lock().expect("pending").remove(&id) {
                            let _ = reply.send(message);
                        }
                    } else if let Some(error) = error_in(&message) {
                        errors.lock().expect("errors").push(error);
                    }
                }
            }
        });
        let mut browser = Browser {
            process,
            _profile: profile,
            commands,
            pending,
            next_id: AtomicU64::new(1),
            session: String::new(),
            errors,
        };
        let target = browser
            .send(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"]
            .as_str()
            .expect("session id")
            .to_owned();
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.call(domain, json!({})).await;
        }
        browser
    }

    /// Sends one DevTools command to the page and returns its result.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        self.send(Some(&self.session), method, params).await
    }

    async fn send(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, reply_tx);
        self.commands
            .send(Message::text(command.to_string()))
            .expect("DevTools connection open");
        let reply = tokio::time::timeout(COMMAND, reply_rx)
            .await
            .unwrap_or_else(|_| panic!("{method} unanswered within {COMMAND:?}"))
            .unwrap_or_else(|_| panic!("DevTools connection closed during {method}"));
        if !reply["error"].is_null() {
            panic!("{method} failed: {}", reply["error"]);
        }
        reply["result"].clone()
    }

    /// Opens `url` and waits until the document and what it loads have loaded.
    pub async fn goto(&self, url: &str) {
        let navigated = self.call("Page.navigate", json!({ "url": url })).await;
        assert!(
            navigated["errorText"].is_null(),
            "cannot open {url}: {}",
            navigated["errorText"]
        );
        self.wait_for(
            "the page has loaded",
            "document.readyState === 'complete'",
            Duration::from_secs(20),
        )
        .await;
    }

    /// Evaluates a JavaScript expression in the page (awaiting a promise) and returns its value.
    pub async fn eval(&self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("evaluating {expression:?} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` every 100 ms until it is truthy, and returns that value; fails
    /// the test, saying `what` was awaited, after `limit`.
    pub async fn wait_for(&self, what: &str, expression: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let value = self.eval(expression).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?} ({expression} is {value}); console errors: {:?}",
                self.errors()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the page's console reported as errors so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors").clone()
    }

    /// Forgets the errors reported so far.
    pub fn clear_errors(&self) {
        self.errors.lock().expect("errors").clear();
    }

    /// Emulates a screen `width` CSS pixels wide (a phone with `mobile`).
    pub async fn viewport(&self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({
                "width": width,
                "height": height,
                "deviceScaleFactor": if mobile { 2 } else { 1 },
                "mobile": mobile,
            }),
        )
        .await;
    }

    /// A PNG of the whole page, beyond the window if it is longer.
    pub async fn screenshot(&self) -> Vec<u8> {
        let layout = self.call("Page.getLayoutMetrics", json!({})).await;
        let size = &layout["cssContentSize"];
        let clip =
            json!({ "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1 });
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true, "clip": clip }),
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64")
    }
}

/// The error an event reports, if it is one: `console.error` (and failed `console.assert`),
/// an uncaught exception or rejected promise, or a browser-side error such as a failed load
/// or a refused Content-Security-Policy.
fn error_in(event: &Value) -> Option<String> {
    let params = &event["params"];
    match event["method"].as_str()? {
        "Runtime.consoleAPICalled"
            if matches!(params["type"].as_str(), Some("error" | "assert")) =>
        {
            let args: Vec<String> = params["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|arg| {
                    arg["value"]
                        .as_str()
                        .map(str::to_owned)
                        .or_else(|| arg["description"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| arg["value"].to_string())
                })
                .collect();
            Some(format!(
                "console.{}: {}",
                params["type"].as_str()?,
                args.join(" ")
            ))
        }
        "Runtime.exceptionThrown" => {
            let details = &params["exceptionDetails"];
            let description = details["exception"]["description"]
                .as_str()
                .unwrap_or_default();
            Some(format!(
                "uncaught: {} {description} ({}:{})",
                details["text"].as_str().unwrap_or_default(),
                details["url"].as_str().unwrap_or_default(),
                details["lineNumber"]
            ))
        }
        "Log.entryAdded" if params["entry"]["level"] == "error" => Some(format!(
            "{}: {} {}",
            params["entry"]["source"].as_str().unwrap_or("log"),
            params["entry"]["text"].as_str().unwrap_or_default(),
            params["entry"]["url"].as_str().unwrap_or_default()
        )),
        "Inspector.targetCrashed" => Some("the page crashed".to_owned()),
        _ => None,
    }
}
