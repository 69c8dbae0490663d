//! The `publish` run: what EC2 and EBS are asked, in order, once the arguments are checked.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sync_aws::ebs::{NewSnapshot, BLOCK_SIZE};
use sync_aws::{
    AwsSettings, BootMode, Ebs, Ec2, ErrorKind, ImageId, ImageInfo, ImageSpec, SnapshotFilter,
    SnapshotId, SnapshotState, StaticCredentials,
};
use sync_common::publish::{self as shared, ImageFormat, PollPause, DIGEST_TAG};

use super::upload::{self, is_zero};
use super::{
    check_ami_name, check_endpoint, check_region, check_tags, note, PublishArgs, PublishError, GIB,
    MAX_VOLUME_GIB, MIB,
};

/// Root device of the AMI: the conventional HVM root name (`/dev/xvda`; Nitro instances
/// show it as nvme0n1 whatever it is called here).
const ROOT_DEVICE: &str = "/dev/xvda";
/// How long a snapshot or image just made may be missing from Describe* (EC2 lists them
/// within seconds; the EBS direct API and EC2 are separate services).
const LISTING_GRACE: Duration = Duration::from_secs(60);

/// Checked arguments: everything a run needs, nothing sent yet.
#[derive(Debug)]
pub(crate) struct Plan {
    args: PublishArgs,
    size: u64,
    volume_gib: u64,
}

/// The file read once: its SHA-256 and the blocks that hold data.
#[derive(Debug)]
struct Scan {
    sha256: String,
    data_blocks: Vec<u32>,
    total_blocks: u64,
}

impl Plan {
    pub(crate) fn new(args: PublishArgs) -> Result<Self, PublishError> {
        let usage = PublishError::Usage;
        check_ami_name(&args.name).map_err(usage)?;
        check_region(&args.region).map_err(usage)?;
        check_tags(&args.tags).map_err(usage)?;
        if let Some(d) = &args.description {
            if d.chars().count() > 255 {
                return Err(usage(
                    "--description: EC2 takes at most 255 characters".into(),
                ));
            }
        }
        for (flag, url) in [
            ("--ec2-endpoint", &args.ec2_endpoint),
            ("--ebs-endpoint", &args.ebs_endpoint),
        ] {
            if let Some(url) = url {
                check_endpoint(flag, url).map_err(usage)?;
            }
        }
        let file = &args.file;
        let shown = file.display();
        let mut f = std::fs::File::open(file).map_err(|e| usage(format!("--file {shown}: {e}")))?;
        let meta = f
            .metadata()
            .map_err(|e| usage(format!("--file {shown}: {e}")))?;
        if !meta.is_file() {
            return Err(usage(format!("--file {shown}: not a regular file")));
        }
        let size = meta.len();
        if size == 0 {
            return Err(usage(format!("--file {shown}: empty")));
        }
        let volume_gib = size.div_ceil(GIB);
        if volume_gib > MAX_VOLUME_GIB {
            return Err(usage(format!(
                "--file {shown}: {volume_gib} GiB is more than an EBS snapshot holds ({MAX_VOLUME_GIB} GiB)"
            )));
        }
        match shared::sniff_format(&mut f, size)
            .map_err(|e| usage(format!("--file {shown}: {e}")))?
        {
            ImageFormat::Raw => {}
            other => {
                return Err(usage(format!(
                    "--file {shown} is a {other:?} image: an EBS snapshot holds the disk's raw \
                     bytes; give the raw image (e.g. sync-gateway.raw, or qemu-img convert -O raw)"
                )))
            }
        }
        Ok(Self {
            args,
            size,
            volume_gib,
        })
    }

    pub(crate) async fn execute(
        self,
        credentials: &StaticCredentials,
    ) -> Result<String, PublishError> {
        let a = &self.args;
        let settings = AwsSettings {
            region: Some(a.region.clone()),
            endpoint_url: a.ec2_endpoint.clone(),
            ..AwsSettings::default()
        };
        // Unmarked: the appliance's AMI and snapshot are not the gateway's to delete.
        let ec2 = Ec2::with_credentials(&settings, a.region.clone(), credentials).unmarked();
        let ebs = Ebs::new(&a.region, a.ebs_endpoint.as_deref(), credentials);

        let scan = self.scan().await?;
        // --timeout-secs bounds the waits for EC2 and EBS, not the upload.
        let deadline = || Instant::now() + Duration::from_secs(a.timeout_secs);

        // A rerun: the image is there (or on its way), so nothing is uploaded again — if it
        // was made from this very file; a rebuilt image needs a new name.
        let existing = ec2
            .find_image_by_name(&a.name)
            .await
            .map_err(PublishError::aws(format!(
                "looking for an AMI named {:?}",
                a.name
            )))?;
        if let Some(image) = existing {
            let recorded = image.tags.get(DIGEST_TAG).map(String::as_str);
            if recorded != Some(scan.sha256.as_str()) {
                return Err(PublishError::Failed(format!(
                    "an AMI named {:?} exists already ({}), made from {} (sha256), not from \
                     this file ({}): choose another --name",
                    a.name,
                    image.id,
                    recorded.unwrap_or("a file not recorded"),
                    scan.sha256
                )));
            }
            if !matches!(image.state.as_str(), "available" | "pending") {
                return Err(PublishError::Failed(format!(
                    "an AMI named {:?} exists already, {} in state {}: deregister it or \
                     choose another --name",
                    a.name, image.id, image.state
                )));
            }
            note(&format!(
                "AMI {:?} exists already ({}, {}), made from this file: nothing uploaded",
                a.name, image.id, image.state
            ));
            let image = self.wait_image(&ec2, &image.id, &scan, deadline()).await?;
            return Ok(image.id.0);
        }

        let (snapshot, deadline) = match self.reusable_snapshot(&ec2, &scan).await? {
            Reuse::Completed(id) => {
                note(&format!(
                    "snapshot {id} of this file is completed already (an earlier run): \
                     nothing uploaded"
                ));
                (id, deadline())
            }
            Reuse::No { failed } => {
                let id = self.upload(&ebs, &scan, &failed).await?;
                let deadline = deadline();
                self.wait_snapshot(&ec2, &id, deadline).await?;
                (id, deadline)
            }
        };

        let mut tags: BTreeMap<String, String> = a.tags.iter().cloned().collect();
        tags.insert(DIGEST_TAG.into(), scan.sha256.clone());
        let spec = ImageSpec {
            name: a.name.clone(),
            description: Some(self.description(&scan)),
            root_snapshot: snapshot.clone(),
            root_device: ROOT_DEVICE.into(),
            extra_snapshots: Vec::new(),
            boot_mode: BootMode::Uefi,
            ena: true,
            tags,
        };
        let image_id = ec2
            .register_image(&spec)
            .await
            .map_err(PublishError::aws(format!(
                "registering {snapshot} as AMI {:?}",
                a.name
            )))?;
        note(&format!(
            "RegisterImage: {image_id} (x86_64, uefi, ENA, {ROOT_DEVICE} from {snapshot}); \
             waiting for it to become available"
        ));
        let image = self.wait_image(&ec2, &image_id, &scan, deadline).await?;
        note(&format!(
            "published {} {:?} in {}: snapshot {snapshot}, {} of {} blocks held data",
            image.id,
            a.name,
            a.region,
            scan.data_blocks.len(),
            scan.total_blocks
        ));
        Ok(image.id.0)
    }

    /// Reads the file once (off the async threads): SHA-256 and the blocks that are not all
    /// zeros.
    async fn scan(&self) -> Result<Scan, PublishError> {
        let path = self.args.file.clone();
        let size = self.size;
        note(&format!(
            "reading {} ({:.1} MiB, {} GiB volume)",
            path.display(),
            size as f64 / MIB as f64,
            self.volume_gib
        ));
        let started = Instant::now();
        let scanned = tokio::task::spawn_blocking(move || {
            let mut data_blocks = Vec::new();
            let sha256 = shared::hash_file(&path, BLOCK_SIZE, |index, block| {
                if !is_zero(block) {
                    // below 2^32: the size is checked against MAX_VOLUME_GIB
                    data_blocks.push(index as u32);
                }
            })?;
            let now = std::fs::metadata(&path)?.len();
            if now != size {
                return Err(std::io::Error::other(format!(
                    "{} is {now} bytes now, {size} when checked",
                    path.display()
                )));
            }
            Ok(Scan {
                sha256,
                data_blocks,
                total_blocks: size.div_ceil(BLOCK_SIZE as u64),
            })
        })
        .await
        .map_err(|e| PublishError::Failed(format!("the file reader failed: {e}")))?
        .map_err(|e| PublishError::Io {
            context: format!("reading {}", self.args.file.display()),
            source: e,
        })?;
        note(&format!(
            "sha256 {}; {} of {} blocks of 512 KiB hold data ({:.1} MiB to send), read in {:.1} s",
            scanned.sha256,
            scanned.data_blocks.len(),
            scanned.total_blocks,
            (scanned.data_blocks.len() * BLOCK_SIZE) as f64 / MIB as f64,
            started.elapsed().as_secs_f64()
        ));
        Ok(scanned)
    }

    fn description(&self, scan: &Scan) -> String {
        self.args.description.clone().unwrap_or_else(|| {
            format!(
                "sync-gateway appliance {} (sha256 {})",
                self.args.name, scan.sha256
            )
        })
    }

    /// A completed snapshot of this file from an earlier run, or the ids of the ones that
    /// failed (they change the client token, so that StartSnapshot does not answer one of
    /// them again).
    async fn reusable_snapshot(&self, ec2: &Ec2, scan: &Scan) -> Result<Reuse, PublishError> {
        let filter = SnapshotFilter::Tags(BTreeMap::from([(
            DIGEST_TAG.to_string(),
            scan.sha256.clone(),
        )]));
        let found = ec2
            .describe_snapshots(&filter)
            .await
            .map_err(PublishError::aws("looking for a snapshot of this file"))?;
        if let Some(done) = found.iter().find(|s| {
            s.state == SnapshotState::Completed && s.volume_size_gib == Some(self.volume_gib)
        }) {
            return Ok(Reuse::Completed(done.id.clone()));
        }
        let mut failed: Vec<String> = found
            .iter()
            .filter(|s| s.state == SnapshotState::Error)
            .map(|s| s.id.0.clone())
            .collect();
        failed.sort();
        Ok(Reuse::No { failed })
    }

    /// StartSnapshot, the data blocks, CompleteSnapshot.
    async fn upload(
        &self,
        ebs: &Ebs,
        scan: &Scan,
        failed: &[String],
    ) -> Result<SnapshotId, PublishError> {
        let a = &self.args;
        let mut tags: BTreeMap<String, String> = a.tags.iter().cloned().collect();
        tags.insert(DIGEST_TAG.into(), scan.sha256.clone());
        let description = self.description(scan);
        let size = self.volume_gib.to_string();
        let tag_text: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let failed_text = failed.join(",");
        // Same file, size, description and tags: the same token, so a retry (or a rerun while
        // the first snapshot is still pending) answers the first snapshot.
        let token = shared::client_token(&[
            &scan.sha256,
            &size,
            &description,
            &tag_text.join("\n"),
            &failed_text,
        ]);
        let started = ebs
            .start_snapshot(&NewSnapshot {
                volume_size_gib: self.volume_gib,
                description: Some(description),
                tags,
                client_token: token,
                timeout_minutes: None,
            })
            .await
            .map_err(PublishError::aws(format!(
                "starting a {} GiB snapshot",
                self.volume_gib
            )))?;
        let id = started.id;
        if let Some(bs) = started.block_size.filter(|&bs| bs != BLOCK_SIZE as i32) {
            // The block index unit is fixed by the API; moto announces 512.
            note(&format!(
                "warning: EBS announced a block size of {bs} bytes for {id}; the EBS direct \
                 API's is {BLOCK_SIZE}, which is used"
            ));
        }
        match started.status.as_str() {
            "pending" => {}
            "completed" => {
                note(&format!(
                    "StartSnapshot answered {id}, completed by an earlier run: nothing uploaded"
                ));
                return Ok(id);
            }
            other => {
                return Err(PublishError::Failed(format!(
                    "StartSnapshot answered {id} in state {other:?} for this file's client \
                     token (an earlier run's snapshot that failed): delete it and run again"
                )))
            }
        }
        note(&format!(
            "StartSnapshot: {id} ({} GiB); uploading {} blocks, {} at once",
            self.volume_gib,
            scan.data_blocks.len(),
            a.concurrency
        ));
        let sent = upload::upload(
            ebs,
            &id,
            &a.file,
            self.size,
            scan.data_blocks.clone(),
            usize::from(a.concurrency),
        )
        .await?;
        let status = ebs
            .complete_snapshot(&id, sent.sent, &sent.checksum)
            .await
            .map_err(PublishError::aws(format!("completing {id}")))?;
        let mib = f64::from(sent.sent) * BLOCK_SIZE as f64 / MIB as f64;
        let secs = sent.elapsed.as_secs_f64();
        note(&format!(
            "CompleteSnapshot {id}: {status}; {} blocks uploaded ({mib:.1} MiB in {secs:.1} s, \
             {:.1} MiB/s), {} zero blocks skipped; checksum {}",
            sent.sent,
            mib / secs.max(1e-3),
            scan.total_blocks - u64::from(sent.sent),
            sent.checksum
        ));
        Ok(id)
    }

    /// Polls DescribeSnapshots until the snapshot is completed; fails on `error` and at
    /// `deadline`.
    async fn wait_snapshot(
        &self,
        ec2: &Ec2,
        id: &SnapshotId,
        deadline: Instant,
    ) -> Result<(), PublishError> {
        let started = Instant::now();
        let mut pause = PollPause::default();
        let mut last_seen = String::new();
        loop {
            let found = match ec2
                .describe_snapshots(&SnapshotFilter::Ids(vec![id.clone()]))
                .await
            {
                Ok(found) => found.into_iter().find(|s| &s.id == id),
                Err(e) if e.kind == ErrorKind::NotFound => None,
                Err(e) => return Err(PublishError::aws(format!("waiting for {id}"))(e)),
            };
            match found {
                Some(s) if s.state == SnapshotState::Completed => {
                    note(&format!(
                        "snapshot {id} completed after {:.1} s",
                        started.elapsed().as_secs_f64()
                    ));
                    return Ok(());
                }
                Some(s) if s.state == SnapshotState::Pending => {
                    let seen = format!("pending {}", s.progress.as_deref().unwrap_or("?"));
                    if seen != last_seen {
                        note(&format!("snapshot {id}: {seen}"));
                        last_seen = seen;
                    }
                }
                Some(s) => {
                    return Err(PublishError::Failed(format!(
                        "snapshot {id} ended {}: {}",
                        s.state,
                        s.state_message.as_deref().unwrap_or("EBS gave no reason")
                    )))
                }
                None if started.elapsed() > LISTING_GRACE => {
                    return Err(PublishError::Failed(format!(
                        "snapshot {id} is not listed by DescribeSnapshots after {} s",
                        started.elapsed().as_secs()
                    )))
                }
                None => {}
            }
            sleep_until_next(&mut pause, deadline, || {
                format!(
                    "timed out waiting for snapshot {id} to complete (last seen: {}); EBS goes \
                     on, run again to keep waiting",
                    if last_seen.is_empty() {
                        "not listed"
                    } else {
                        &last_seen
                    }
                )
            })
            .await?;
        }
    }

    /// Polls DescribeImages until the AMI is available and carries this file's digest; fails
    /// on another end state, on another file's digest, and at `deadline`.
    async fn wait_image(
        &self,
        ec2: &Ec2,
        id: &ImageId,
        scan: &Scan,
        deadline: Instant,
    ) -> Result<ImageInfo, PublishError> {
        let started = Instant::now();
        let mut pause = PollPause::default();
        let mut last_seen = String::new();
        loop {
            let image = match ec2.describe_image(id).await {
                Ok(image) => Some(image),
                Err(e) if e.kind == ErrorKind::NotFound => None,
                Err(e) => return Err(PublishError::aws(format!("waiting for {id}"))(e)),
            };
            let grace_over = started.elapsed() > LISTING_GRACE;
            match image {
                Some(image) => {
                    let recorded = image.tags.get(DIGEST_TAG).map(String::as_str);
                    match (image.state.as_str(), recorded) {
                        (_, Some(other)) if other != scan.sha256 => {
                            return Err(PublishError::Failed(format!(
                                "AMI {id} named {:?} was made from another file (sha256 \
                                 {other}), not this one: another publisher registered the \
                                 name at the same time; choose another --name",
                                self.args.name
                            )))
                        }
                        ("available", Some(_)) => return Ok(image),
                        // Tags set at creation may show a moment later.
                        ("available", None) if !grace_over => {}
                        ("available", None) => {
                            return Err(PublishError::Failed(format!(
                                "AMI {id} shows no {DIGEST_TAG} tag: it was not registered by \
                                 this run"
                            )))
                        }
                        ("pending", _) => {
                            if last_seen != "pending" {
                                note(&format!("AMI {id}: pending"));
                                last_seen = "pending".into();
                            }
                        }
                        (other, _) => {
                            return Err(PublishError::Failed(format!(
                                "AMI {id} ended {other}: deregister it and run again"
                            )))
                        }
                    }
                }
                None if grace_over => {
                    return Err(PublishError::Failed(format!(
                        "AMI {id} is not listed by DescribeImages after {} s",
                        started.elapsed().as_secs()
                    )))
                }
                None => {}
            }
            sleep_until_next(&mut pause, deadline, || {
                format!(
                    "timed out waiting for AMI {id} to become available (last seen: {}); run \
                     again to keep waiting",
                    if last_seen.is_empty() {
                        "not listed"
                    } else {
                        &last_seen
                    }
                )
            })
            .await?;
        }
    }
}

/// What an earlier run left of this file.
#[derive(Debug)]
enum Reuse {
    Completed(SnapshotId),
    No { failed: Vec<String> },
}

/// Sleeps the next poll pause, or fails with `timed_out()` when `deadline` has passed.
async fn sleep_until_next(
    pause: &mut PollPause,
    deadline: Instant,
    timed_out: impl FnOnce() -> String,
) -> Result<(), PublishError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(PublishError::Failed(timed_out()));
    }
    tokio::time::sleep(pause.take().min(left)).await;
    Ok(())
}
