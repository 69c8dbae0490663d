//! A fault proxy in front of moto, shared by sync-aws's tests and the gateway's end-to-end AWS
//! test (both include this file by `#[path]`). moto answers at once, never fails and has no
//! disks; the proxy adds what real EC2 does and moto does not:
//!
//! - it records every EC2 request: moto ignores parts of some, so tests assert on what was sent;
//! - it answers chosen requests ([`Fault`]), or a seeded random share of all of them
//!   ([`FaultProxy::with_random_faults`]), with an injected EC2 error;
//! - it plays udev ([`FaultProxy::with_udev`]): an attached volume appears in a by-id directory
//!   under the name the NVMe driver gives EBS volumes, and disappears on detach;
//! - it reports chosen snapshots as `error` ([`FaultProxy::fail_snapshot`]): moto's snapshots
//!   are born `completed`, real ones sometimes fail;
//! - it tags registered images ([`FaultProxy::with_image_tags`]): moto's RegisterImage drops
//!   the request's TagSpecifications, which EC2 applies at creation.
//!
//! Everything it listens on and talks to is on 127.0.0.1.
#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::fs::{self, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// A path, not `mod query;`: this file is itself included by path from two packages' tests.
#[path = "ec2_query.rs"]
mod query;
use query::{child, child_text, elements, error_xml, set_items, url_decode_form};

/// What the NVMe driver's udev rules name an EBS volume in `/dev/disk/by-id`: the volume id
/// without its dash is the disk's serial number.
const BY_ID_PREFIX: &str = "nvme-Amazon_Elastic_Block_Store_";

/// `StateMessage` of a snapshot failed by [`FaultProxy::fail_snapshot`] (on the wire the
/// element is `statusMessage`).
const SNAPSHOT_FAILED_MESSAGE: &str = "injected by the fault proxy: snapshot failed";

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
    /// The next `times` requests of `action` get EC2 error `code` with HTTP `status`.
    pub fn error(action: &str, times: u64, status: u16, code: &str) -> Fault {
        Fault {
            action: Some(action.into()),
            times,
            status,
            code: code.into(),
            forward_first: false,
        }
    }

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
    /// Answered with an injected error (scripted or random).
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
    random: Mutex<RandomFaults>,
    log: Mutex<Vec<Recorded>>,
    udev: Mutex<Option<Udev>>,
    udev_errors: Mutex<Vec<String>>,
    snapshots: Mutex<SnapshotFaults>,
    /// Apply RegisterImage's image tags with CreateTags (see [`FaultProxy::with_image_tags`]).
    image_tags: AtomicBool,
    client: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Debug)]
struct RandomFaults {
    rate: f64,
    rng: StdRng,
}

#[derive(Debug, Clone)]
struct Udev {
    by_id: PathBuf,
    /// The volumes' contents, hard-linked into `by_id` while attached: like EBS, a volume
    /// keeps its data across detach and attach, and loses it only when deleted.
    store: PathBuf,
}

#[derive(Debug, Default)]
struct SnapshotFaults {
    failed: BTreeSet<String>,
    /// How many of the next snapshots that CreateSnapshot makes join `failed`.
    fail_next_created: u64,
}

impl FaultProxy {
    pub async fn start(upstream: &str, faults: Vec<Fault>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_owned(),
            faults: Mutex::new(faults),
            random: Mutex::new(RandomFaults {
                rate: 0.0,
                rng: StdRng::seed_from_u64(0),
            }),
            log: Mutex::new(Vec::new()),
            udev: Mutex::new(None),
            udev_errors: Mutex::new(Vec::new()),
            snapshots: Mutex::new(SnapshotFaults::default()),
            image_tags: AtomicBool::new(false),
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

    /// Answers a share `rate` (0..=1) of the requests that no scripted [`Fault`] matches with
    /// a transient EC2 error, not forwarded: mostly throttling, sometimes a server error.
    /// The draws come from `seed`, so the same sequence of requests gets the same faults
    /// (concurrent callers may order their requests differently from run to run).
    pub fn with_random_faults(self, rate: f64, seed: u64) -> Self {
        self.set_fault_rate(rate);
        self.state.random.lock().unwrap().rng = StdRng::seed_from_u64(seed);
        self
    }

    /// Changes the share of randomly faulted requests (0 stops them), keeping the draws.
    pub fn set_fault_rate(&self, rate: f64) {
        assert!(
            (0.0..=1.0).contains(&rate),
            "fault rate {rate} not in 0..=1"
        );
        self.state.random.lock().unwrap().rate = rate;
    }

    /// Adds a scripted fault; scripted faults apply in the order added.
    pub fn add_fault(&self, fault: Fault) {
        self.state.faults.lock().unwrap().push(fault);
    }

    /// Emulates udev: when moto accepts an AttachVolume, a sparse file of the volume's size
    /// appears as `by_id_dir/nvme-Amazon_Elastic_Block_Store_vol<hex>` before the response is
    /// relayed; it goes on DetachVolume and DeleteVolume. The contents live in the sibling
    /// directory `<by_id_dir>.ebs` until the volume is deleted. Every attached volume shows up,
    /// whichever instance it was attached to.
    pub fn with_udev(self, by_id_dir: PathBuf) -> Self {
        let name = by_id_dir
            .file_name()
            .expect("by-id dir has a name")
            .to_string_lossy()
            .into_owned();
        let store = by_id_dir.with_file_name(format!("{name}.ebs"));
        fs::create_dir_all(&by_id_dir).unwrap();
        fs::create_dir_all(&store).unwrap();
        *self.state.udev.lock().unwrap() = Some(Udev {
            by_id: by_id_dir,
            store,
        });
        self
    }

    /// Makes registered images carry their tags: moto's RegisterImage keeps only name and
    /// description, so when moto accepts one, the proxy sends moto a CreateTags with the
    /// request's `image` TagSpecifications before relaying the answer, as EC2 would have
    /// tagged the image at creation. (Block device mappings, boot mode and ENA stay lost in
    /// moto: assert them on the recorded request.)
    pub fn with_image_tags(self) -> Self {
        self.state.image_tags.store(true, Ordering::Relaxed);
        self
    }

    /// Where udev emulation shows `volume` (`vol-…`) while it is attached.
    pub fn by_id_path(&self, volume: &str) -> PathBuf {
        let udev = self.state.udev.lock().unwrap();
        let udev = udev.as_ref().expect("with_udev was not called");
        udev.by_id.join(by_id_name(volume))
    }

    /// What udev emulation could not do (e.g. learn a volume's size); tests assert it is empty.
    pub fn udev_errors(&self) -> Vec<String> {
        self.state.udev_errors.lock().unwrap().clone()
    }

    /// From now on, every DescribeSnapshots response reports snapshot `id` as `error`, with a
    /// `StateMessage`, as EBS does for a snapshot that failed.
    pub fn fail_snapshot(&self, id: &str) {
        self.state
            .snapshots
            .lock()
            .unwrap()
            .failed
            .insert(id.to_owned());
    }

    /// The next `n` snapshots created through the proxy fail as with
    /// [`FaultProxy::fail_snapshot`]: for tests that do not know the ids the code under test
    /// will get.
    pub fn fail_next_snapshots(&self, n: u64) {
        self.state.snapshots.lock().unwrap().fail_next_created += n;
    }

    /// The snapshots reported as `error`.
    pub fn failed_snapshots(&self) -> Vec<String> {
        let snapshots = self.state.snapshots.lock().unwrap();
        snapshots.failed.iter().cloned().collect()
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

    /// How many requests got an injected error, scripted or random.
    pub fn injected_count(&self) -> u64 {
        self.injected().values().sum()
    }

    /// Injected errors per Action.
    pub fn injected(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for r in self.state.log.lock().unwrap().iter().filter(|r| r.faulted) {
            *counts.entry(r.action.clone()).or_default() += 1;
        }
        counts
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The by-id name of `volume` (`vol-0abc…` → `nvme-Amazon_Elastic_Block_Store_vol0abc…`).
pub fn by_id_name(volume: &str) -> String {
    format!("{BY_ID_PREFIX}{}", volume.replace('-', ""))
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
        let fault = self
            .scripted_fault(&action)
            .or_else(|| self.random_fault(&action));
        let request_id = {
            let mut log = self.log.lock().unwrap();
            log.push(Recorded {
                action: action.clone(),
                params: params.clone(),
                faulted: fault.is_some(),
            });
            format!("fault-proxy-{}", log.len())
        };
        match fault {
            None => self.forward(&parts, body, &action, &params).await,
            Some(f) => {
                if f.forward_first {
                    let _ = self.forward(&parts, body, &action, &params).await;
                }
                ec2_error(f.status, &f.code, &request_id)
            }
        }
    }

    fn scripted_fault(&self, action: &str) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap();
        faults
            .iter_mut()
            .find(|f| f.times > 0 && f.action.as_ref().is_none_or(|a| a == action))
            .map(|f| {
                f.times -= 1;
                f.clone()
            })
    }

    fn random_fault(&self, action: &str) -> Option<Fault> {
        let mut random = self.random.lock().unwrap();
        let rate = random.rate;
        if rate == 0.0 || !random.rng.gen_bool(rate) {
            return None;
        }
        // Throttling is what a busy account sees most; the server errors are the other codes
        // EC2 documents as retryable. Both must be retried, never surface.
        let (status, code) = match random.rng.gen_range(0..10) {
            0 => (500, "InternalError"),
            1 => (503, "Unavailable"),
            _ => (503, "RequestLimitExceeded"),
        };
        Some(Fault {
            action: Some(action.to_owned()),
            times: 1,
            status,
            code: code.into(),
            forward_first: false,
        })
    }

    /// Relays the request to moto and its answer back, after playing the effects of a
    /// successful answer that moto does not have (udev, failed snapshots).
    async fn forward(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        action: &str,
        params: &HashMap<String, String>,
    ) -> Response<Full<Bytes>> {
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
            .request(up.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let (mut rp, rb) = resp.into_parts();
        let mut body = rb.collect().await.unwrap().to_bytes();
        if rp.status.is_success() {
            let volume = params.get("VolumeId").map(String::as_str).unwrap_or("");
            match action {
                "AttachVolume" => self.udev_attach(volume, &parts.headers).await,
                "DetachVolume" => self.udev_remove(volume, false),
                "DeleteVolume" => self.udev_remove(volume, true),
                "CreateSnapshot" => self.snapshot_created(&body),
                "RegisterImage" if self.image_tags.load(Ordering::Relaxed) => {
                    self.tag_registered_image(&body, params, &parts.headers)
                        .await
                }
                "DescribeSnapshots" => {
                    if let Some(rewritten) = self.rewrite_failed_snapshots(&body) {
                        body = Bytes::from(rewritten);
                        // hyper sets the new length from the body
                        rp.headers.remove(CONTENT_LENGTH);
                    }
                }
                _ => {}
            }
        }
        Response::from_parts(rp, Full::new(body))
    }

    async fn udev_attach(&self, volume: &str, headers: &HeaderMap) {
        let Some(udev) = self.udev.lock().unwrap().clone() else {
            return;
        };
        let result = match self.volume_size_gib(volume, headers).await {
            Ok(gib) => udev.attach(volume, gib << 30).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.udev_error(format!("attach {volume}: {e}"));
        }
    }

    fn udev_remove(&self, volume: &str, deleted: bool) {
        let Some(udev) = self.udev.lock().unwrap().clone() else {
            return;
        };
        if let Err(e) = udev.remove(volume, deleted) {
            self.udev_error(format!("remove {volume}: {e}"));
        }
    }

    fn udev_error(&self, e: String) {
        eprintln!("fault proxy: udev emulation: {e}");
        self.udev_errors.lock().unwrap().push(e);
    }

    /// Asks moto: AttachVolume does not carry the size, and the volume may have been created
    /// before the proxy started, from a snapshot, or resized since.
    async fn volume_size_gib(&self, volume: &str, headers: &HeaderMap) -> Result<u64, String> {
        let mut req = Request::post(format!("{}/", self.upstream)).header(
            CONTENT_TYPE,
            "application/x-www-form-urlencoded; charset=utf-8",
        );
        // moto does not check signatures but takes the region from the credential scope.
        if let Some(auth) = headers.get(AUTHORIZATION) {
            req = req.header(AUTHORIZATION, auth);
        }
        let body = format!("Action=DescribeVolumes&Version=2016-11-15&VolumeId.1={volume}");
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .map_err(|e| format!("DescribeVolumes: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("DescribeVolumes: {e}"))?
            .to_bytes();
        let xml = String::from_utf8_lossy(&body);
        if !status.is_success() {
            return Err(format!("DescribeVolumes: HTTP {status}: {xml}"));
        }
        let size = set_items(&xml, "volumeSet")
            .into_iter()
            .find(|item| child_text(&xml, item.inner.clone(), "volumeId") == Some(volume))
            .and_then(|item| child_text(&xml, item.inner, "size"))
            .ok_or_else(|| format!("no size of {volume} in DescribeVolumes: {xml}"))?;
        size.parse()
            .map_err(|_| format!("size {size:?} of {volume} is not a number"))
    }

    /// CreateTags on the image moto just registered, with the request's image tags.
    async fn tag_registered_image(
        &self,
        body: &[u8],
        params: &HashMap<String, String>,
        headers: &HeaderMap,
    ) {
        let xml = String::from_utf8_lossy(body);
        let Some(root) = elements(&xml, 0..xml.len()).into_iter().next() else {
            return;
        };
        let Some(image) = child_text(&xml, root.inner, "imageId") else {
            return;
        };
        let mut form = vec![
            ("Action".to_string(), "CreateTags".to_string()),
            ("Version".to_string(), "2016-11-15".to_string()),
            ("ResourceId.1".to_string(), image.to_string()),
        ];
        let mut n = 0;
        for spec in 1.. {
            let Some(kind) = params.get(&format!("TagSpecification.{spec}.ResourceType")) else {
                break;
            };
            if kind != "image" {
                continue;
            }
            for tag in 1.. {
                let key = params.get(&format!("TagSpecification.{spec}.Tag.{tag}.Key"));
                let value = params.get(&format!("TagSpecification.{spec}.Tag.{tag}.Value"));
                let Some(key) = key else { break };
                n += 1;
                form.push((format!("Tag.{n}.Key"), key.clone()));
                form.push((format!("Tag.{n}.Value"), value.cloned().unwrap_or_default()));
            }
        }
        if n == 0 {
            return;
        }
        let body: Vec<String> = form
            .iter()
            .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
            .collect();
        let mut req = Request::post(format!("{}/", self.upstream)).header(
            CONTENT_TYPE,
            "application/x-www-form-urlencoded; charset=utf-8",
        );
        // moto does not check signatures but takes the region from the credential scope.
        if let Some(auth) = headers.get(AUTHORIZATION) {
            req = req.header(AUTHORIZATION, auth);
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::from(body.join("&")))).unwrap())
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "fault proxy: CreateTags on {image} failed: HTTP {}",
            resp.status()
        );
    }

    fn snapshot_created(&self, body: &[u8]) {
        let mut snapshots = self.snapshots.lock().unwrap();
        if snapshots.fail_next_created == 0 {
            return;
        }
        let xml = String::from_utf8_lossy(body);
        let Some(root) = elements(&xml, 0..xml.len()).into_iter().next() else {
            return;
        };
        if let Some(id) = child_text(&xml, root.inner, "snapshotId") {
            snapshots.failed.insert(id.to_owned());
            snapshots.fail_next_created -= 1;
        }
    }

    fn rewrite_failed_snapshots(&self, body: &[u8]) -> Option<String> {
        let snapshots = self.snapshots.lock().unwrap();
        if snapshots.failed.is_empty() {
            return None;
        }
        let xml = String::from_utf8_lossy(body);
        let mut statuses: Vec<Range<usize>> = set_items(&xml, "snapshotSet")
            .into_iter()
            .filter(|item| {
                child_text(&xml, item.inner.clone(), "snapshotId")
                    .is_some_and(|id| snapshots.failed.contains(id))
            })
            .filter_map(|item| child(&xml, item.inner, "status").map(|s| s.outer))
            .collect();
        if statuses.is_empty() {
            return None;
        }
        // back to front, so that the earlier ranges stay valid
        statuses.sort_by_key(|r| std::cmp::Reverse(r.start));
        let mut out = xml.into_owned();
        for r in statuses {
            out.replace_range(
                r,
                &format!(
                    "<status>error</status><statusMessage>{SNAPSHOT_FAILED_MESSAGE}</statusMessage>"
                ),
            );
        }
        Some(out)
    }
}

impl Udev {
    fn attach(&self, volume: &str, size: u64) -> io::Result<()> {
        let contents = self.store.join(volume);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&contents)?;
        if file.metadata()?.len() < size {
            file.set_len(size)?;
        }
        // A link, not a copy or a rename: the by-id entry appears at once with its full size
        // (a reader never sees a short file) and the contents outlive it.
        match fs::hard_link(&contents, self.by_id.join(by_id_name(volume))) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    }

    fn remove(&self, volume: &str, deleted: bool) -> io::Result<()> {
        remove_if_present(&self.by_id.join(by_id_name(volume)))?;
        if deleted {
            remove_if_present(&self.store.join(volume))?;
        }
        Ok(())
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Percent-encodes a form value: unreserved characters as they are, every other byte `%XX`.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An injected error, answered as EC2 would, with a request id the test can recognize.
fn ec2_error(status: u16, code: &str, request_id: &str) -> Response<Full<Bytes>> {
    let xml = error_xml(code, "injected by the fault proxy", request_id);
    let mut resp = Response::new(Full::new(Bytes::from(xml)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp.headers_mut()
        .insert(CONTENT_TYPE, "text/xml".parse().unwrap());
    resp
}
