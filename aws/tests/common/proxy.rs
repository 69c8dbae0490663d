//! A fault proxy in front of moto: records every EC2 request (moto ignores parts of some, so
//! tests assert on what was sent), and answers chosen requests with an injected EC2 error.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An error to inject.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Only requests of this EC2 Action (None: any).
    pub action: Option<String>,
    /// How many matching requests get it.
    pub times: u64,
    pub status: u16,
    pub code: String,
    /// Forward the request to moto first, then answer the error anyway: a lost response.
    pub forward_first: bool,
}

impl Fault {
    pub fn throttle(action: &str, times: u64) -> Fault {
        Fault {
            action: Some(action.into()),
            times,
            status: 503,
            code: "RequestLimitExceeded".into(),
            forward_first: false,
        }
    }
}

/// One recorded request: the EC2 Action and the decoded form parameters.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub action: String,
    pub params: HashMap<String, String>,
    pub faulted: bool,
}

#[derive(Debug)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    upstream: String,
    faults: Mutex<Vec<Fault>>,
    log: Mutex<Vec<Recorded>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl FaultProxy {
    pub async fn start(upstream: &str, faults: Vec<Fault>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_owned(),
            faults: Mutex::new(faults),
            log: Mutex::new(Vec::new()),
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(st.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FaultProxy { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.log.lock().unwrap().clone()
    }

    /// The requests of one Action.
    pub fn requests_of(&self, action: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.action == action)
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl State {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let params: HashMap<String, String> = url_decode_form(&body);
        let action = params.get("Action").cloned().unwrap_or_default();
        let fault = {
            let mut faults = self.faults.lock().unwrap();
            faults
                .iter_mut()
                .find(|f| f.times > 0 && f.action.as_ref().is_none_or(|a| *a == action))
                .map(|f| {
                    f.times -= 1;
                    f.clone()
                })
        };
        self.log.lock().unwrap().push(Recorded {
            action,
            params,
            faulted: fault.is_some(),
        });
        let forward = || async {
            let mut up = Request::builder().method(parts.method.clone()).uri(format!(
                "{}{}",
                self.upstream,
                parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/")
            ));
            for (k, v) in &parts.headers {
                up = up.header(k, v);
            }
            let resp = self
                .client
                .request(up.body(Full::new(body.clone())).unwrap())
                .await
                .unwrap();
            let (rp, rb) = resp.into_parts();
            Response::from_parts(rp, Full::new(rb.collect().await.unwrap().to_bytes()))
        };
        match fault {
            None => forward().await,
            Some(f) => {
                if f.forward_first {
                    let _ = forward().await;
                }
                let xml = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>injected by the fault proxy</Message></Error></Errors><RequestID>fault-proxy-{}</RequestID></Response>",
                    f.code,
                    self.log.lock().unwrap().len()
                );
                let mut resp = Response::new(Full::new(Bytes::from(xml)));
                *resp.status_mut() = StatusCode::from_u16(f.status).unwrap();
                resp.headers_mut()
                    .insert("content-type", "text/xml".parse().unwrap());
                resp
            }
        }
    }
}

/// `application/x-www-form-urlencoded` → map (EC2 query protocol bodies).
fn url_decode_form(body: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
