//! A minimal W3C WebDriver client over `reqwest`, enough to drive headless Chromium
//! through `chromedriver`: open a page, run a script, click, take a screenshot. No
//! WebDriver crate is needed for that much.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The key under which WebDriver returns an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The first of `names` found on `PATH`.
fn find_on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Where Chromium and chromedriver are: `CHROME_BIN` and `CHROMEDRIVER`, or `PATH`.
pub struct Browsers {
    /// The Chromium binary.
    pub chromium: PathBuf,
    /// The matching chromedriver.
    pub chromedriver: PathBuf,
}

impl Browsers {
    /// Both binaries, or `None` when either is missing.
    pub fn find() -> Option<Browsers> {
        let from_env = |name: &str| std::env::var_os(name).map(PathBuf::from).filter(|p| p.is_file());
        Some(Browsers {
            chromium: from_env("CHROME_BIN")
                .or_else(|| find_on_path(&["chromium", "chromium-browser", "google-chrome"]))?,
            chromedriver: from_env("CHROMEDRIVER").or_else(|| find_on_path(&["chromedriver"]))?,
        })
    }
}

/// A running chromedriver, killed on drop.
pub struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
    chromium: PathBuf,
}

impl Driver {
    /// Starts chromedriver on a free loopback port, logging to `log`, and waits
    /// until it says it is ready.
    pub async fn start(browsers: &Browsers, log: &Path) -> Result<Driver> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(&browsers.chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", browsers.chromedriver.display()))?;
        let driver = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?,
            chromium: browsers.chromium.clone(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ready = match driver.http.get(format!("{}/status", driver.base)).send().await {
                Ok(r) => r.json::<Value>().await.ok().and_then(|v| v["value"]["ready"].as_bool()),
                Err(_) => None,
            };
            if ready == Some(true) {
                return Ok(driver);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "chromedriver not ready on port {port} within 20 s (log: {})",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens a headless Chromium window of `width` x `height` CSS pixels.
    pub async fn session(&self, width: u32, height: u32) -> Result<Session> {
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": self.chromium,
                        "args": [
                            "--headless=new",
                            // Root (CI containers) cannot use Chromium's sandbox.
                            "--no-sandbox",
                            "--disable-dev-shm-usage",
                            "--disable-gpu",
                            "--no-first-run",
                            "--disable-extensions",
                            "--hide-scrollbars",
                            "--force-device-scale-factor=1",
                            format!("--window-size={width},{height}"),
                        ],
                    },
                },
            },
        });
        let value = call(
            &self.http,
            reqwest::Method::POST,
            &format!("{}/session", self.base),
            Some(capabilities),
        )
        .await
        .context("opening a Chromium session")?;
        let id = value["sessionId"].as_str().context("no sessionId in the new session")?;
        Ok(Session {
            http: self.http.clone(),
            url: format!("{}/session/{id}", self.base),
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one WebDriver command; answers its `value`, or the WebDriver error.
async fn call(http: &reqwest::Client, method: reqwest::Method, url: &str, body: Option<Value>) -> Result<Value> {
    let mut request = http.request(method.clone(), url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.with_context(|| format!("{method} {url}"))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("{method} {url}: not JSON"))?;
    if !status.is_success() {
        bail!(
            "{method} {url}: {status}: {} {}",
            body["value"]["error"].as_str().unwrap_or("?"),
            body["value"]["message"].as_str().unwrap_or("")
        );
    }
    Ok(body["value"].clone())
}

/// One browser window.
pub struct Session {
    http: reqwest::Client,
    url: String,
}

impl Session {
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        call(&self.http, method, &format!("{}{path}", self.url), body).await
    }

    /// Navigates to `url` and waits for it to load.
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .map(drop)
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and answers what it
    /// returns.
    pub async fn execute(&self, script: &str, args: Value) -> Result<Value> {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Clicks the first element matching a CSS selector, as a user would. A live
    /// page may replace the element between finding and clicking it; then it is
    /// found again (a few times).
    pub async fn click(&self, css: &str) -> Result<()> {
        let mut attempts = 0;
        loop {
            match self.click_once(css).await {
                Err(e) if attempts < 5 && format!("{e:#}").contains("stale element") => attempts += 1,
                other => return other,
            }
        }
    }

    async fn click_once(&self, css: &str) -> Result<()> {
        let element = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        let id = element[ELEMENT_KEY]
            .as_str()
            .with_context(|| format!("no element reference in {element}"))?;
        self.command(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({})))
            .await
            .map(drop)
    }

    /// Resizes the window to `width` x `height` CSS pixels.
    pub async fn resize(&self, width: u32, height: u32) -> Result<()> {
        self.command(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await
        .map(drop)
    }

    /// A PNG screenshot of the window.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        let value = self.command(reqwest::Method::GET, "/screenshot", None).await?;
        decode_base64(value.as_str().context("screenshot is not a string")?)
    }

    /// Closes the window (and the browser).
    pub async fn quit(self) -> Result<()> {
        call(&self.http, reqwest::Method::DELETE, &self.url, None)
            .await
            .map(drop)
    }
}

/// Decodes standard base64 (as WebDriver sends screenshots).
fn decode_base64(text: &str) -> Result<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= sextet(*c).with_context(|| format!("invalid base64 byte {c:#x}"))? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => bail!("truncated base64"),
        };
        out.extend_from_slice(&bytes[1..=n]);
    }
    Ok(out)
}

#[test]
fn base64_decodes_padded_and_unpadded_input() {
    assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(decode_base64("aGVsbG8h").unwrap(), b"hello!");
    assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
    assert!(decode_base64("a").is_err());
    assert!(decode_base64("a*==").is_err());
}
