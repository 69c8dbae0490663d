//! Launch: register an AMI from snapshots, run an instance from it, describe both.

use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Filter, Image,
    Instance, InstanceType, LaunchTemplateSpecification, ResourceType,
};

use super::{tags_to_map, Ec2};
use crate::config::DEFAULT_INSTANCE_TYPE;
use crate::error::{AwsError, ErrorKind};
use crate::types::{
    BootMode, ImageId, ImageInfo, ImageSpec, InstanceId, InstanceInfo, LaunchSpec, SnapshotId,
    VolumeId,
};

impl Ec2 {
    /// Registers an HVM x86_64 AMI whose root device is `spec.root_snapshot` and whose
    /// further disks are `spec.extra_snapshots`, with the given boot mode and ENA. AMI names
    /// are unique per account and region, so a retry whose first attempt succeeded unseen
    /// (`InvalidAMIName.Duplicate`) returns the existing image of that name.
    pub async fn register_image(&self, spec: &ImageSpec) -> Result<ImageId, AwsError> {
        const OP: &str = "ec2:RegisterImage";
        let ebs = |snap: &SnapshotId| {
            EbsBlockDevice::builder()
                .snapshot_id(snap.as_str())
                .delete_on_termination(true)
                .volume_type(aws_sdk_ec2::types::VolumeType::from(
                    self.settings.volume_type.as_str(),
                ))
                .build()
        };
        let mut mappings = vec![BlockDeviceMapping::builder()
            .device_name(&spec.root_device)
            .ebs(ebs(&spec.root_snapshot))
            .build()];
        mappings.extend(spec.extra_snapshots.iter().map(|(dev, snap)| {
            BlockDeviceMapping::builder()
                .device_name(dev)
                .ebs(ebs(snap))
                .build()
        }));
        let boot_mode = match spec.boot_mode {
            BootMode::Uefi => BootModeValues::Uefi,
            BootMode::LegacyBios => BootModeValues::LegacyBios,
        };
        let tag_spec = self.tag_spec(ResourceType::Image, &spec.tags);
        let result = self
            .retrier
            .run(
                OP,
                self.not_found_until(spec.root_snapshot.as_str()),
                || {
                    self.client
                        .register_image()
                        .name(&spec.name)
                        .set_description(spec.description.clone())
                        .architecture(ArchitectureValues::X8664)
                        .virtualization_type("hvm")
                        .root_device_name(&spec.root_device)
                        .set_block_device_mappings(Some(mappings.clone()))
                        .boot_mode(boot_mode.clone())
                        .ena_support(spec.ena)
                        .tag_specifications(tag_spec.clone())
                        .send()
                },
            )
            .await;
        let id = match result {
            Ok(out) => out
                .image_id()
                .ok_or_else(|| AwsError::missing(OP, "ImageId"))?
                .to_owned(),
            Err(e) if e.code.as_deref() == Some("InvalidAMIName.Duplicate") => {
                match self.find_image_by_name(&spec.name).await? {
                    Some(img) => return Ok(img.id),
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        self.created(&id);
        Ok(ImageId(id))
    }

    /// One image by id.
    pub async fn describe_image(&self, id: &ImageId) -> Result<ImageInfo, AwsError> {
        const OP: &str = "ec2:DescribeImages";
        let out = self
            .retrier
            .run(OP, self.not_found_until(id.as_str()), || {
                self.client.describe_images().image_ids(id.as_str()).send()
            })
            .await?;
        out.images()
            .iter()
            .find(|i| i.image_id() == Some(id.as_str()))
            .map(image_info)
            .ok_or_else(|| {
                AwsError::local(OP, ErrorKind::NotFound, format!("{id} not in the response"))
            })
    }

    /// The account's own image named `name`, if any.
    pub async fn find_image_by_name(&self, name: &str) -> Result<Option<ImageInfo>, AwsError> {
        Ok(self
            .describe_images(Some("self"), Some(name))
            .await?
            .into_iter()
            .next())
    }

    /// Images by owner (`self`, `amazon`, an account id) and/or exact name.
    pub async fn describe_images(
        &self,
        owner: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<ImageInfo>, AwsError> {
        const OP: &str = "ec2:DescribeImages";
        let out = self
            .retrier
            .run(OP, None, || {
                self.client
                    .describe_images()
                    .set_owners(owner.map(|o| vec![o.to_owned()]))
                    .set_filters(
                        name.map(|n| vec![Filter::builder().name("name").values(n).build()]),
                    )
                    .send()
            })
            .await?;
        Ok(out.images().iter().map(image_info).collect())
    }

    /// Launches one instance of `spec.image` with the settings' subnet, security groups,
    /// instance type, key pair and launch template (explicit settings override the
    /// template's). Instance and volumes are tagged at creation.
    pub async fn run_instances(&self, spec: &LaunchSpec) -> Result<InstanceId, AwsError> {
        const OP: &str = "ec2:RunInstances";
        let s = &self.settings;
        let template = s.launch_template_id.as_ref().map(|id| {
            LaunchTemplateSpecification::builder()
                .launch_template_id(id)
                .set_version(s.launch_template_version.clone())
                .build()
        });
        let instance_type = match (&s.instance_type, &template) {
            (Some(t), _) => Some(InstanceType::from(t.as_str())),
            (None, Some(_)) => None,
            (None, None) => Some(InstanceType::from(DEFAULT_INSTANCE_TYPE)),
        };
        let groups = (!s.security_group_ids.is_empty()).then(|| s.security_group_ids.clone());
        let tag_specs = vec![
            self.tag_spec(ResourceType::Instance, &spec.tags),
            self.tag_spec(ResourceType::Volume, &spec.tags),
        ];
        let out = self
            .retrier
            .run(OP, self.not_found_until(spec.image.as_str()), || {
                self.client
                    .run_instances()
                    .image_id(spec.image.as_str())
                    .min_count(1)
                    .max_count(1)
                    .client_token(&spec.client_token)
                    .set_instance_type(instance_type.clone())
                    .set_subnet_id(s.subnet_id.clone())
                    .set_security_group_ids(groups.clone())
                    .set_key_name(s.key_name.clone())
                    .set_launch_template(template.clone())
                    .set_tag_specifications(Some(tag_specs.clone()))
                    .send()
            })
            .await?;
        let id = out
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .ok_or_else(|| AwsError::missing(OP, "Instances[0].InstanceId"))?
            .to_owned();
        self.created(&id);
        Ok(InstanceId(id))
    }

    /// The instance's state, image, placement and block devices.
    pub async fn describe_instance(&self, id: &InstanceId) -> Result<InstanceInfo, AwsError> {
        const OP: &str = "ec2:DescribeInstances";
        let out = self
            .retrier
            .run(OP, self.not_found_until(id.as_str()), || {
                self.client
                    .describe_instances()
                    .instance_ids(id.as_str())
                    .send()
            })
            .await?;
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id.as_str()))
            .map(instance_info)
            .ok_or_else(|| {
                AwsError::local(OP, ErrorKind::NotFound, format!("{id} not in the response"))
            })
    }
}

fn image_info(i: &Image) -> ImageInfo {
    ImageInfo {
        id: ImageId(i.image_id().unwrap_or_default().to_owned()),
        name: i.name().map(str::to_owned),
        state: i.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
        root_device: i.root_device_name().map(str::to_owned),
        block_devices: i
            .block_device_mappings()
            .iter()
            .map(|m| {
                let snap = m.ebs().and_then(|e| e.snapshot_id()).map(SnapshotId::from);
                (m.device_name().unwrap_or_default().to_owned(), snap)
            })
            .collect(),
        tags: tags_to_map(i.tags()),
    }
}

fn instance_info(i: &Instance) -> InstanceInfo {
    InstanceInfo {
        id: InstanceId(i.instance_id().unwrap_or_default().to_owned()),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
        image_id: i.image_id().map(ImageId::from),
        instance_type: i.instance_type().map(|t| t.as_str().to_owned()),
        availability_zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .map(str::to_owned),
        private_ip: i.private_ip_address().map(str::to_owned),
        block_devices: i
            .block_device_mappings()
            .iter()
            .map(|m| {
                let vol = m.ebs().and_then(|e| e.volume_id()).map(VolumeId::from);
                (m.device_name().unwrap_or_default().to_owned(), vol)
            })
            .collect(),
        tags: tags_to_map(i.tags()),
    }
}
