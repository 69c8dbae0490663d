//! A proxy in front of moto's EBS direct API (REST + JSON, unlike EC2's query API that
//! tests/common/ec2_proxy.rs speaks): it records every request with the headers that carry
//! EBS's parameters, because moto ignores ClientToken, ChangedBlocksCount and the snapshot
//! checksum; and it answers chosen requests with an EBS error, before or after moto saw them
//! (a refused call, or a call that happened but whose answer was lost).
//! Everything it listens on and talks to is on 127.0.0.1.
#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The EBS direct operation of a request, from its method and path.
pub fn operation(method: &Method, path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["snapshots"]) => "StartSnapshot",
        ("POST", ["snapshots", "completion", _]) => "CompleteSnapshot",
        ("PUT", ["snapshots", _, "blocks", _]) => "PutSnapshotBlock",
        ("GET", ["snapshots", _, "blocks"]) => "ListSnapshotBlocks",
        ("GET", ["snapshots", _, "blocks", _]) => "GetSnapshotBlock",
        ("GET", ["snapshots", _, "changedblocks"]) => "ListChangedBlocks",
        _ => "Unknown",
    }
}

/// An EBS error to answer instead of (or after) moto.
#[derive(Debug, Clone)]
pub struct EbsFault {
    pub operation: &'static str,
    /// How many matching requests get it.
    pub times: u64,
    pub status: u16,
    /// `x-amzn-ErrorType`, e.g. `RequestThrottledException`.
    pub code: &'static str,
    /// Forward to moto first, then answer the error anyway: a lost response.
    pub forward_first: bool,
}

impl EbsFault {
    /// EBS's throttling answer (HTTP 400, `RequestThrottledException`).
    pub fn throttle(operation: &'static str, times: u64) -> Self {
        Self {
            operation,
            times,
            status: 400,
            code: "RequestThrottledException",
            forward_first: false,
        }
    }

    /// A server error (HTTP 500, `InternalServerException`) after moto did the work.
    pub fn lost_response(operation: &'static str, times: u64) -> Self {
        Self {
            operation,
            times,
            status: 500,
            code: "InternalServerException",
            forward_first: true,
        }
    }

    /// A refusal that no retry fixes.
    pub fn denied(operation: &'static str, times: u64) -> Self {
        Self {
            operation,
            times,
            status: 403,
            code: "AccessDeniedException",
            forward_first: false,
        }
    }
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct EbsRequest {
    pub operation: &'static str,
    pub path: String,
    /// Lower-cased header names.
    pub headers: HashMap<String, String>,
    /// StartSnapshot's JSON body; other bodies are not kept.
    pub json: Option<serde_json::Value>,
    pub body_len: usize,
    pub faulted: bool,
}

#[derive(Debug)]
pub struct EbsProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    upstream: String,
    faults: Mutex<Vec<EbsFault>>,
    log: Mutex<Vec<EbsRequest>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl EbsProxy {
    pub async fn start(upstream: &str) -> EbsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_owned(),
            faults: Mutex::new(Vec::new()),
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
        EbsProxy { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a fault; faults apply in the order added.
    pub fn add_fault(&self, fault: EbsFault) {
        self.state.faults.lock().unwrap().push(fault);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<EbsRequest> {
        self.state.log.lock().unwrap().clone()
    }

    /// The requests of one operation.
    pub fn requests_of(&self, operation: &str) -> Vec<EbsRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.operation == operation)
            .collect()
    }
}

impl Drop for EbsProxy {
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
        let op = operation(&parts.method, parts.uri.path());
        let fault = {
            let mut faults = self.faults.lock().unwrap();
            faults
                .iter_mut()
                .find(|f| f.times > 0 && f.operation == op)
                .map(|f| {
                    f.times -= 1;
                    f.clone()
                })
        };
        self.log.lock().unwrap().push(EbsRequest {
            operation: op,
            path: parts.uri.path().to_owned(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        v.to_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
            json: (op == "StartSnapshot")
                .then(|| serde_json::from_slice(&body).ok())
                .flatten(),
            body_len: body.len(),
            faulted: fault.is_some(),
        });
        match fault {
            None => self.forward(&parts, body).await,
            Some(f) => {
                if f.forward_first {
                    let _ = self.forward(&parts, body).await;
                }
                let json = format!(
                    r#"{{"Message":"injected by the EBS proxy","Reason":"{}"}}"#,
                    f.code
                );
                Response::builder()
                    .status(StatusCode::from_u16(f.status).unwrap())
                    .header("content-type", "application/json")
                    .header("x-amzn-errortype", f.code)
                    .header("x-amzn-requestid", "ebs-proxy")
                    .body(Full::new(Bytes::from(json)))
                    .unwrap()
            }
        }
    }

    async fn forward(&self, parts: &http::request::Parts, body: Bytes) -> Response<Full<Bytes>> {
        let target = format!(
            "{}{}",
            self.upstream,
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let mut up = Request::builder().method(parts.method.clone()).uri(target);
        for (k, v) in &parts.headers {
            up = up.header(k, v);
        }
        let resp = self
            .client
            .request(up.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let (rp, rb) = resp.into_parts();
        let body = rb.collect().await.unwrap().to_bytes();
        Response::from_parts(rp, Full::new(body))
    }
}
