//! Finding the block device of an attached cloud disk by its serial, never by device order.
//!
//! udev names every disk under `/dev/disk/by-id` after its serial: an EBS volume on a Nitro
//! instance appears as `nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0` (the volume id
//! without its dash), an Alibaba Cloud disk as `virtio-bp1abcdefghijklmnopq` (the disk id without
//! `d-`). Device names like `/dev/nvme1n1` or `/dev/vdb` depend on attach order and are never
//! used to identify a disk. The directory is configurable, so tests play udev with plain files.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why an attached disk's device was not found.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{id:?} is not a valid {what} id")]
    BadId { what: &'static str, id: String },
    #[error("no {name} under {dir} after {waited:?} (is the disk attached, and udev running?)")]
    NotFound {
        dir: PathBuf,
        name: String,
        waited: Duration,
    },
    #[error("cannot resolve {path}: {source}")]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The by-id name of an EBS volume (`vol-` and 8 or 17 hex digits).
pub fn ebs_by_id_name(volume_id: &str) -> Result<String, DeviceError> {
    let hex = volume_id
        .strip_prefix("vol-")
        .filter(|h| (h.len() == 8 || h.len() == 17) && h.bytes().all(|b| b.is_ascii_hexdigit()));
    match hex {
        Some(h) => Ok(format!("nvme-Amazon_Elastic_Block_Store_vol{h}")),
        None => Err(DeviceError::BadId {
            what: "EBS volume",
            id: volume_id.to_string(),
        }),
    }
}

/// The by-id name of an Alibaba Cloud disk (`d-` and lowercase letters and digits).
pub fn aliyun_by_id_name(disk_id: &str) -> Result<String, DeviceError> {
    let serial = disk_id.strip_prefix("d-").filter(|s| {
        (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    match serial {
        Some(s) => Ok(format!("virtio-{s}")),
        None => Err(DeviceError::BadId {
            what: "Alibaba Cloud disk",
            id: disk_id.to_string(),
        }),
    }
}

/// The serial an Alibaba Cloud disk shows on an NVMe-attached instance (g7se and later
/// families), where udev names it `nvme-MODEL_SERIAL` instead of `virtio-SERIAL`.
pub fn aliyun_nvme_suffix(disk_id: &str) -> Result<String, DeviceError> {
    let virtio = aliyun_by_id_name(disk_id)?;
    Ok(format!("_{}", virtio.trim_start_matches("virtio-")))
}

/// Waits until `dir/name` exists — or, with `nvme_suffix`, an `nvme-…` entry ending in it —
/// then returns the path it resolves to (the `/dev/vdX` or `/dev/nvmeXn1` behind udev's
/// symlink, or the plain file in tests). Polls every 100 ms: udev creates the link within a
/// second or two of the attachment completing.
pub async fn wait_for_device(
    dir: &Path,
    name: &str,
    nvme_suffix: Option<&str>,
    timeout: Duration,
) -> Result<PathBuf, DeviceError> {
    let started = tokio::time::Instant::now();
    loop {
        let mut path = dir.join(name);
        if let Some(suffix) = nvme_suffix {
            if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
                while let Ok(Some(e)) = entries.next_entry().await {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with("nvme-") && n.ends_with(suffix) && !n.contains("-part") {
                        path = e.path();
                        break;
                    }
                }
            }
        }
        match tokio::fs::canonicalize(&path).await {
            Ok(p) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DeviceError::Resolve { path, source }),
        }
        if started.elapsed() >= timeout {
            return Err(DeviceError::NotFound {
                dir: dir.to_path_buf(),
                name: name.to_string(),
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn serial_names() {
        assert_eq!(
            ebs_by_id_name("vol-0123456789abcdef0").unwrap(),
            "nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"
        );
        assert_eq!(
            ebs_by_id_name("vol-1a2b3c4d").unwrap(),
            "nvme-Amazon_Elastic_Block_Store_vol1a2b3c4d"
        );
        for bad in [
            "vol-",
            "vol-xyz",
            "snap-0123456789abcdef0",
            "vol-../../etc",
            "",
        ] {
            assert!(ebs_by_id_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            aliyun_by_id_name("d-bp1abcdefghijk123").unwrap(),
            "virtio-bp1abcdefghijk123"
        );
        for bad in ["bp1abc", "d-", "d-ABC", "d-a/b"] {
            assert!(aliyun_by_id_name(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn waits_for_the_link_to_appear_and_resolves_it() {
        let dir = tempfile::tempdir().unwrap();
        let by_id = dir.path().join("by-id");
        std::fs::create_dir(&by_id).unwrap();
        let dev = dir.path().join("nvme1n1");
        std::fs::write(&dev, b"").unwrap();
        let name = ebs_by_id_name("vol-0123456789abcdef0").unwrap();
        let link = by_id.join(&name);
        let maker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::os::unix::fs::symlink("../nvme1n1", &link).unwrap();
        });
        let found = wait_for_device(&by_id, &name, None, Duration::from_secs(10))
            .await
            .unwrap();
        maker.await.unwrap();
        assert_eq!(found, dev.canonicalize().unwrap());
    }

    #[tokio::test]
    async fn an_alibaba_disk_is_also_found_by_its_nvme_name() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("nvme1n1");
        std::fs::write(&dev, b"").unwrap();
        let id = "d-bp1abc123";
        let nvme = "nvme-Alibaba_Cloud_Elastic_Block_Storage_bp1abc123";
        std::os::unix::fs::symlink(&dev, dir.path().join(nvme)).unwrap();
        std::os::unix::fs::symlink(&dev, dir.path().join(format!("{nvme}-part1"))).unwrap();
        let name = aliyun_by_id_name(id).unwrap();
        let suffix = aliyun_nvme_suffix(id).unwrap();
        let found = wait_for_device(dir.path(), &name, Some(&suffix), Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(found, dev.canonicalize().unwrap());
    }

    #[tokio::test]
    async fn gives_up_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = wait_for_device(dir.path(), "virtio-x", None, Duration::from_millis(250))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("virtio-x"), "{e}");
    }
}
