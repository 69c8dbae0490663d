//! Launches: an image of a checkpoint's snapshots and an instance of it, recorded under
//! `DATA_DIR/PROVIDER/launches/`.

use super::*;

impl<A: CloudApi> CloudBackend<A> {
    /// Makes an image of completed snapshots (the first is the boot disk) and starts an
    /// instance of it with the configured network settings.
    pub async fn launch(
        &self,
        snapshots: Vec<SnapshotInfo>,
        test: bool,
    ) -> Result<LaunchInfo, BackendError> {
        let inner = &self.inner;
        let Some(boot) = snapshots.first() else {
            return Err(BackendError::Unsupported {
                disk: "*".into(),
                message: "a launch needs at least one snapshot".into(),
            });
        };
        if let Some(s) = snapshots
            .iter()
            .find(|s| s.state != SnapshotState::Completed)
        {
            return Err(BackendError::SnapshotPending {
                disk: s.disk_id.clone(),
                snapshot: s.id.clone(),
            });
        }
        let disk = boot.disk_id.as_str();
        if snapshots.len() > A::MAX_LAUNCH_DISKS {
            return Err(BackendError::Unsupported {
                disk: disk.into(),
                message: format!(
                    "a launch maps at most {} disks, not {}",
                    A::MAX_LAUNCH_DISKS,
                    snapshots.len()
                ),
            });
        }
        let boot_mode = self.boot_mode(disk).await;
        let kind = if test { "test" } else { "cutover" };
        let mut tags = inner.base_tags(disk);
        tags.insert(TAG_LAUNCH.into(), kind.into());
        tags.insert(TAG_SNAPSHOT.into(), boot.id.clone());
        // An image is reused only for the same snapshots in the same order and boot mode.
        let key = {
            let mut h = Sha256::new();
            for s in &snapshots {
                h.update(s.id.as_bytes());
                h.update(b"\n");
            }
            h.update(boot_mode.as_str().as_bytes());
            hex::encode(h.finalize())[..16].to_string()
        };
        tags.insert(TAG_IMAGE_KEY.into(), key.clone());
        let req = LaunchRequest {
            disk_id: disk.into(),
            image_name: format!("sync-gateway {disk} {} {kind} {key}", boot.id),
            description: format!(
                "sync-gateway: {disk} at checkpoint {} ({})",
                boot.label, boot.created
            ),
            snapshots: snapshots.iter().map(|s| s.id.clone()).collect(),
            boot_mode,
            tags,
            client_token: format!("sgw-{:032x}", rand::random::<u128>()),
        };
        let launched = inner
            .api
            .launch(&req)
            .await
            .map_err(|e| BackendError::cloud(disk, e))?;
        let launch = LaunchInfo {
            instance_id: launched.instance_id.clone(),
            test,
            state: launched.state,
            created_unix_ms: crate::server::disk::unix_ms(),
            disks: snapshots
                .iter()
                .map(|s| LaunchDisk {
                    disk_id: s.disk_id.clone(),
                    snapshot_id: s.id.clone(),
                    path: None,
                })
                .collect(),
            image_id: Some(launched.image_id.clone()),
        };
        let dir = inner.dir.join("launches");
        let path = dir.join(format!("{}.json", safe_name(&launch.instance_id)));
        let json = serde_json::to_vec_pretty(&launch).unwrap_or_default();
        durable::create_dir_all_durable(&dir)
            .and_then(|()| durable::atomic_write(&path, &json, 0o600))
            .map_err(|source| BackendError::Io {
                disk: disk.into(),
                action: "record launch in",
                path,
                source,
            })?;
        info!(disk, instance = %launch.instance_id, image = %launched.image_id, test,
            state = %launch.state, boot_mode = boot_mode.as_str(), "instance launched");
        Ok(launch)
    }

    /// The boot mode of a launch of `disk`: configured, or read from the staging volume's
    /// partition table (which a checkpoint's snapshot shares unless the source repartitioned).
    async fn boot_mode(&self, disk: &str) -> BootMode {
        if let Some(m) = self.inner.api.boot_mode() {
            return m;
        }
        let record = self.inner.volumes().get(disk).cloned();
        let detected = match record {
            Some(r) => tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&r.device)?;
                bootmode::detect_from(
                    |buf, off| std::os::unix::fs::FileExt::read_exact_at(&f, buf, off),
                    r.size_bytes,
                )
            })
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten(),
            None => None,
        };
        match detected {
            Some(m) => m,
            None => {
                // What both clouds assume of an x86_64 image that names no boot mode.
                warn!(disk, "boot mode not detectable from the partition table; using legacy-bios (set boot_mode to override)");
                BootMode::LegacyBios
            }
        }
    }

    /// Recorded launches, oldest first, with their instance state refreshed now and then.
    pub async fn list_launches(&self) -> Result<Vec<LaunchInfo>, BackendError> {
        let dir = self.inner.dir.join("launches");
        let mut out: Vec<LaunchInfo> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| load_json(&e.path()))
                .collect(),
            Err(_) => Vec::new(),
        };
        for l in &mut out {
            let cached = lock(&self.inner.launch_states)
                .get(&l.instance_id)
                .filter(|(at, _)| at.elapsed() < LAUNCH_STATE_TTL)
                .map(|(_, s)| s.clone());
            let state = match cached {
                Some(s) => s,
                None => match self.inner.api.instance_state(&l.instance_id).await {
                    Ok(s) => s,
                    Err(e) if e.kind == CloudErrorKind::NotFound => "terminated".into(),
                    Err(_) => l.state.clone(),
                },
            };
            lock(&self.inner.launch_states)
                .insert(l.instance_id.clone(), (Instant::now(), state.clone()));
            l.state = state;
        }
        out.sort_by(|a, b| {
            (a.created_unix_ms, &a.instance_id).cmp(&(b.created_unix_ms, &b.instance_id))
        });
        Ok(out)
    }
}
