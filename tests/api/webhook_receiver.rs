//! A real HTTP endpoint on 127.0.0.1 for webhook tests: it records every request it gets (headers
//! and body, in arrival order) and answers as the test's script says: a status, or nothing at
//! all (a hung endpoint, which the server must time out).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, StatusCode};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::mpsc;

/// How long an awaited request may take: far more than it ever should.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// One request the endpoint got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// Its place among every request the endpoint got, from 0.
    pub index: usize,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn event_type(&self) -> String {
        self.json()["type"].as_str().unwrap_or_default().to_owned()
    }

    pub fn key_id(&self) -> String {
        self.json()["data"]["key_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn event_id(&self) -> String {
        self.header("webhook-id").to_owned()
    }

    /// Whether `webhook-signature` holds the Standard Webhooks signature of this request under
    /// `secret` (`whsec_` + base64), computed here independently of the server's code.
    pub fn signed_by(&self, secret: &str) -> bool {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.strip_prefix("whsec_").expect("a whsec_ secret"))
            .expect("base64");
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(
            format!(
                "{}.{}.",
                self.header("webhook-id"),
                self.header("webhook-timestamp")
            )
            .as_bytes(),
        );
        mac.update(&self.body);
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        self.header("webhook-signature")
            .split(' ')
            .any(|signature| signature == expected)
    }
}

/// How the endpoint answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    /// Never answers.
    Hang,
}

type Script = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

pub struct Receiver {
    /// The URL to give CreateWebhook.
    pub url: String,
    requests: mpsc::UnboundedReceiver<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// An endpoint that answers 200 to everything.
    pub async fn accepting() -> Self {
        Self::scripted(|_| Reply::Status(200)).await
    }

    /// An endpoint that answers each request as `script` says.
    pub async fn scripted(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        let script: Script = Arc::new(script);
        let (sender, requests) = mpsc::unbounded_channel();
        let count = Arc::new(AtomicUsize::new(0));
        let handler = move |headers: HeaderMap, body: Bytes| {
            let script = script.clone();
            let sender = sender.clone();
            let count = count.clone();
            async move {
                let received = Received {
                    headers,
                    body: body.to_vec(),
                    index: count.fetch_add(1, Ordering::SeqCst),
                };
                let reply = script(&received);
                let _ = sender.send(received);
                match reply {
                    Reply::Status(status) => StatusCode::from_u16(status).unwrap(),
                    Reply::Hang => {
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                }
            }
        };
        let app = axum::Router::new().route("/hook", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            requests,
            task,
        }
    }

    /// The next request; panics if none comes in time.
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(PATIENCE, self.requests.recv())
            .await
            .expect("a webhook request in time")
            .expect("the endpoint runs")
    }

    /// Every request up to and including the first whose event is about `key_id` of type
    /// `event_type`.
    pub async fn until(&mut self, event_type: &str, key_id: &str) -> Vec<Received> {
        let mut got = Vec::new();
        loop {
            let request = self.next().await;
            let done = request.event_type() == event_type && request.key_id() == key_id;
            got.push(request);
            if done {
                return got;
            }
        }
    }

    /// The requests already received and not yet taken, without waiting.
    pub fn drain(&mut self) -> Vec<Received> {
        let mut got = Vec::new();
        while let Ok(request) = self.requests.try_recv() {
            got.push(request);
        }
        got
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
