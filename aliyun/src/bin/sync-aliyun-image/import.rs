//! The `import` run: what the clouds are asked, in order, once the arguments are checked.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sync_aliyun::ecs::{EcsClient, EcsConfig, Filter, Image, ImportImage, Tag};
use sync_aliyun::oss::{OssClient, OssConfig, PutOptions, PutResult};
use sync_aliyun::Credentials;
use sync_common::publish::{self as shared, PollPause, DIGEST_TAG};

use super::{
    check_image_name, check_object_key, client_token, note, Format, ImageError, ImportArgs, MIB,
};

/// SHA-256 of a file, in hex (read in 1 MiB blocks off the async threads).
async fn file_sha256(path: &std::path::Path) -> Result<String, ImageError> {
    let path = path.to_path_buf();
    let shown = path.display().to_string();
    let hashed =
        tokio::task::spawn_blocking(move || shared::hash_file(&path, MIB as usize, |_, _| {}))
            .await;
    match hashed {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(ImageError::Failed(format!("cannot read {shown}: {e}"))),
        Err(e) => Err(ImageError::Failed(format!("cannot hash {shown}: {e}"))),
    }
}

/// How long a new image may be missing from DescribeImages: ECS lists it within seconds.
const LISTING_GRACE: Duration = Duration::from_secs(60);
/// Pause between progress lines on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Checked arguments: everything a run needs, nothing sent yet.
#[derive(Debug)]
pub(crate) struct Plan {
    args: ImportArgs,
    size: u64,
    format: Format,
}

impl Plan {
    pub(crate) fn new(args: ImportArgs) -> Result<Self, ImageError> {
        let usage = ImageError::Usage;
        check_image_name(&args.image_name).map_err(usage)?;
        check_object_key(&args.key).map_err(usage)?;
        if args.region.is_empty()
            || !args
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(usage(format!(
                "--region {:?}: not a region id like cn-hangzhou",
                args.region
            )));
        }
        if args.tags.len() > 20 {
            return Err(usage(format!(
                "{} tags given; ECS takes at most 20",
                args.tags.len()
            )));
        }
        let file = &args.file;
        let mut f = std::fs::File::open(file)
            .map_err(|e| usage(format!("--file {}: {e}", file.display())))?;
        let meta = f
            .metadata()
            .map_err(|e| usage(format!("--file {}: {e}", file.display())))?;
        if !meta.is_file() {
            return Err(usage(format!(
                "--file {}: not a regular file",
                file.display()
            )));
        }
        let size = meta.len();
        if size == 0 {
            return Err(usage(format!("--file {}: empty", file.display())));
        }
        let format = match (args.format, Format::from_extension(file)) {
            (Some(f), _) | (None, Some(f)) => f,
            (None, None) => {
                return Err(usage(format!(
                    "--file {}: cannot tell the format from the extension; give --format",
                    file.display()
                )))
            }
        };
        let found = shared::sniff_format(&mut f, size)
            .map(Format::sniffed)
            .map_err(|e| usage(format!("--file {}: {e}", file.display())))?;
        if found != format {
            return Err(usage(format!(
                "--file {} looks like {}, not {}: ECS would fail the import",
                file.display(),
                found.ecs_name(),
                format.ecs_name()
            )));
        }
        Ok(Self { args, size, format })
    }

    pub(crate) async fn execute(self, credentials: Credentials) -> Result<String, ImageError> {
        let a = &self.args;
        let mut ecs_config = EcsConfig::new(&a.region);
        if let Some(e) = &a.ecs_endpoint {
            ecs_config = ecs_config.with_endpoint(e);
        }
        let ecs = EcsClient::new(ecs_config, Arc::new(credentials.clone()))
            .map_err(|e| ImageError::Usage(format!("--ecs-endpoint: {e}")))?;
        let part_size = a.part_size_mib * MIB;
        let oss_config = OssConfig {
            endpoint: a.oss_endpoint.clone(),
            multipart_threshold: part_size,
            part_size,
            ..OssConfig::new(&a.region, &a.bucket)
        };
        let oss = OssClient::new(oss_config, credentials)
            .map_err(|e| ImageError::Usage(e.to_string()))?;

        let object = format!("oss://{}/{}", a.bucket, a.key);
        let digest = file_sha256(&a.file).await?;
        // A rerun: the image is there (or on its way), so nothing is uploaded again — if it
        // was imported from this very file; a rebuilt image needs a new name.
        if let Some(image) = find_by_name(&ecs, &a.image_name).await? {
            let recorded = image
                .tags
                .iter()
                .find(|t| t.key == DIGEST_TAG)
                .map(|t| t.value.as_str());
            if recorded != Some(digest.as_str()) {
                return Err(ImageError::Failed(format!(
                    "an image named {:?} exists already ({}), imported from {} (sha256), not \
                     from this file ({digest}): choose another --image-name",
                    a.image_name,
                    image.image_id,
                    recorded.unwrap_or("an unrecorded file")
                )));
            }
            if !matches!(image.status.as_str(), "Available" | "Waiting" | "Creating") {
                return Err(ImageError::Failed(format!(
                    "an image named {:?} exists already, {} in state {}: delete it or choose \
                     another --image-name",
                    a.image_name, image.image_id, image.status
                )));
            }
            note(&format!(
                "image {:?} exists already ({}, {}); waiting for it instead of importing again \
                 (choose another --image-name for a new import)",
                a.image_name, image.image_id, image.status
            ));
            let started = Instant::now();
            let image = self.wait_available(&ecs, &image.image_id).await?;
            // An earlier run that timed out left the object for this one to remove.
            let object_fate = match oss.head_object(&a.key).await {
                Err(e) if e.is_not_found() => format!("no object at {object}"),
                _ => self.dispose(&oss, &object).await,
            };
            note(&format!(
                "image {} {:?} is Available ({} boot) after {:.1} s; nothing uploaded; \
                 {object_fate}",
                image.image_id,
                a.image_name,
                image.boot_mode.as_deref().unwrap_or("?"),
                started.elapsed().as_secs_f64()
            ));
            return Ok(image.image_id);
        }

        let upload_started = Instant::now();
        let put = self.upload(&oss, &object).await?;
        let upload_time = upload_started.elapsed();
        let import_started = Instant::now();
        let imported = async {
            self.verify(&oss, &object, &put).await?;
            let image_id = self.import(&ecs, &digest).await?;
            note(&format!(
                "ImportImage: {image_id}; waiting for it to become Available"
            ));
            self.wait_available(&ecs, &image_id).await
        }
        .await;
        let image = imported.inspect_err(|_| {
            note(&format!(
                "{object} is left in place: delete it, or import it again under another name"
            ))
        })?;
        let import_time = import_started.elapsed();

        let object_fate = self.dispose(&oss, &object).await;
        let secs = upload_time.as_secs_f64();
        note(&format!(
            "imported {} {:?} in {}: {} boot, {}, platform {}; uploaded {:.1} MiB in {:.1} s \
             ({:.1} MiB/s, {}); import took {:.1} s; {object_fate}",
            image.image_id,
            a.image_name,
            a.region,
            image.boot_mode.as_deref().unwrap_or("?"),
            self.format.ecs_name(),
            a.platform,
            self.size as f64 / MIB as f64,
            secs,
            self.size as f64 / MIB as f64 / secs.max(1e-3),
            if put.parts.is_empty() {
                "one PUT".to_string()
            } else {
                format!("multipart, {} parts", put.parts.len())
            },
            import_time.as_secs_f64(),
        ));
        Ok(image.image_id)
    }

    /// Deletes the object unless `--keep-object`; says what became of it.
    async fn dispose(&self, oss: &OssClient, object: &str) -> String {
        if self.args.keep_object {
            return format!("kept at {object}");
        }
        match oss.delete_object(&self.args.key).await {
            Ok(()) => format!("{object} deleted"),
            Err(e) => {
                // The image is made; a leftover object costs storage, not correctness.
                note(&format!(
                    "warning: could not delete {object}: {}; delete it by hand",
                    shared::error_chain(&e)
                ));
                format!("{object} NOT deleted")
            }
        }
    }

    async fn upload(&self, oss: &OssClient, object: &str) -> Result<PutResult, ImageError> {
        let a = &self.args;
        let how = if self.size > oss.config().multipart_threshold {
            format!("multipart, parts of {} MiB", a.part_size_mib)
        } else {
            "one PUT".to_string()
        };
        note(&format!(
            "uploading {} ({:.1} MiB, {}) to {object} ({how})",
            a.file.display(),
            self.size as f64 / MIB as f64,
            self.format.ecs_name()
        ));
        let opts = PutOptions {
            progress: Some(progress_printer()),
            ..PutOptions::default()
        };
        oss.put_object_from_file(&a.key, &a.file, &opts)
            .await
            .map_err(ImageError::oss(format!(
                "uploading {} to {object}",
                a.file.display()
            )))
    }

    /// HEAD: OSS holds as many bytes as the file has, under the ETag the upload was given.
    async fn verify(
        &self,
        oss: &OssClient,
        object: &str,
        put: &PutResult,
    ) -> Result<(), ImageError> {
        let head = oss
            .head_object(&self.args.key)
            .await
            .map_err(ImageError::oss(format!("checking {object}")))?;
        if head.size != self.size || !head.etag.eq_ignore_ascii_case(&put.etag) {
            return Err(ImageError::Failed(format!(
                "{object} holds {} bytes with ETag {}, but {} bytes were sent with ETag {}",
                head.size, head.etag, self.size, put.etag
            )));
        }
        Ok(())
    }

    async fn import(&self, ecs: &EcsClient, digest: &str) -> Result<String, ImageError> {
        let a = &self.args;
        let mut req = ImportImage::new(&a.image_name, &a.bucket, &a.key);
        req.format = Some(self.format.ecs_name().to_string());
        req.boot_mode = a.boot_mode.ecs_name().to_string();
        req.architecture = "x86_64".into();
        req.os_type = "linux".into();
        req.platform = Some(a.platform.clone());
        req.description = a.description.clone();
        req.tags = a.tags.clone();
        req.tags.push(Tag::new(DIGEST_TAG, digest));
        req.client_token = Some(client_token(
            &a.region,
            &a.image_name,
            &a.bucket,
            &format!("{}\0{digest}", a.key),
        ));
        match ecs.import_image(&req).await {
            Ok(id) => Ok(id),
            // Another run imported the same name since we looked: that image is the answer.
            Err(e) if e.code() == Some("InvalidImageName.Duplicated") => {
                match find_by_name(ecs, &a.image_name).await? {
                    Some(image) => Ok(image.image_id),
                    None => Err(ImageError::ecs("ImportImage")(e)),
                }
            }
            Err(e) => Err(ImageError::ecs(format!(
                "importing oss://{}/{} as {:?}",
                a.bucket, a.key, a.image_name
            ))(e)),
        }
    }

    /// Polls DescribeImages until the image is Available; fails on CreateFailed (or another
    /// end state) and after `--timeout-secs`.
    async fn wait_available(&self, ecs: &EcsClient, image_id: &str) -> Result<Image, ImageError> {
        let timeout = Duration::from_secs(self.args.timeout_secs);
        let started = Instant::now();
        let mut pause = PollPause::default();
        let mut last_seen = String::new();
        loop {
            let found = ecs
                .describe_images(&Filter::ids([image_id]))
                .await
                .map_err(ImageError::ecs(format!("waiting for image {image_id}")))?
                .into_iter()
                .find(|i| i.image_id == image_id);
            let elapsed = started.elapsed();
            match found {
                Some(image) if image.status == "Available" => return Ok(image),
                Some(image) if matches!(image.status.as_str(), "Waiting" | "Creating") => {
                    let seen = format!("{} {}%", image.status, image.progress);
                    if seen != last_seen {
                        note(&format!("image {image_id}: {seen}"));
                        last_seen = seen;
                    }
                }
                Some(image) => {
                    return Err(ImageError::Failed(format!(
                        "image {image_id} ended {}: ECS could not import oss://{}/{} \
                         (is it a bootable {} image? the import task in the ECS console tells \
                         why)",
                        image.status,
                        self.args.bucket,
                        self.args.key,
                        self.format.ecs_name()
                    )))
                }
                None if elapsed > LISTING_GRACE => {
                    return Err(ImageError::Failed(format!(
                        "image {image_id} is not listed by DescribeImages after {} s",
                        elapsed.as_secs()
                    )))
                }
                None => {}
            }
            if elapsed >= timeout {
                return Err(ImageError::Failed(format!(
                    "timed out after {} s waiting for image {image_id} to become Available \
                     (last seen: {}); the import goes on in ECS, rerun to keep waiting",
                    timeout.as_secs(),
                    if last_seen.is_empty() {
                        "not listed"
                    } else {
                        &last_seen
                    }
                )));
            }
            tokio::time::sleep(pause.take().min(timeout.saturating_sub(elapsed))).await;
        }
    }
}

/// This account's image named `name`, in any state.
async fn find_by_name(ecs: &EcsClient, name: &str) -> Result<Option<Image>, ImageError> {
    let images = ecs
        .describe_images(&Filter::default())
        .await
        .map_err(ImageError::ecs(format!(
            "looking for an image named {name:?}"
        )))?;
    Ok(images.into_iter().find(|i| i.name.as_deref() == Some(name)))
}

/// A progress callback printing bytes sent and the rate, every `PROGRESS_EVERY` and at the end.
fn progress_printer() -> sync_aliyun::oss::ProgressFn {
    let started = Instant::now();
    // (when the last line was printed, whether the final one was)
    let printed = Mutex::new((None::<Instant>, false));
    Arc::new(move |sent: u64, total: u64| {
        let Ok(mut printed) = printed.lock() else {
            return;
        };
        let (last, done) = &mut *printed;
        let now = Instant::now();
        let due = last.is_none_or(|t| now.duration_since(t) >= PROGRESS_EVERY);
        let end = sent >= total && !*done;
        if !(due || end) || *done {
            return;
        }
        *last = Some(now);
        *done = sent >= total;
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        note(&format!(
            "sent {:.1} of {:.1} MiB ({}%), {:.1} MiB/s",
            sent as f64 / MIB as f64,
            total as f64 / MIB as f64,
            (sent * 100).checked_div(total).unwrap_or(100),
            sent as f64 / MIB as f64 / secs
        ));
    })
}
