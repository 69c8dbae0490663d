//! `sync-aliyun-image`: puts a disk image (the appliance's raw or qcow2) into OSS and imports
//! it as an ECS custom image; `scripts/publish-aliyun` runs it.
//!
//! ```text
//! sync-aliyun-image import --file PATH --bucket B --key OBJECT_KEY --image-name NAME --region R
//!     [--format raw|qcow2|vhd] [--boot-mode UEFI|BIOS] [--platform Debian]
//!     [--description TEXT] [--tag KEY=VALUE]... [--ecs-endpoint URL] [--oss-endpoint URL]
//!     [--part-size-mib N] [--timeout-secs N] [--keep-object]
//! ```
//!
//! ```text
//! check args and file ──▶ DescribeImages: NAME there already? ──yes──▶ wait for it (a rerun)
//!                                          │ no
//!                                          ▼
//! upload (multipart above one part) ──▶ HEAD: size and ETag ──▶ ImportImage (ClientToken)
//!        ──▶ DescribeImages until Available ──▶ DeleteObject (unless --keep-object)
//! ```
//!
//! Credentials come from the variables the Alibaba Cloud CLI and SDKs read:
//! `ALIBABA_CLOUD_ACCESS_KEY_ID`, `ALIBABA_CLOUD_ACCESS_KEY_SECRET` and, for STS credentials,
//! `ALIBABA_CLOUD_SECURITY_TOKEN` (never flags: arguments show in `ps`).
//!
//! Reruns are cheap and safe: an image of the same name is waited for, not imported again
//! (and the file not uploaded again), and the `ClientToken` of ImportImage is derived from
//! region, name, bucket and key, so a retried call whose answer was lost makes no second image.
//!
//! Output: the image id alone on stdout (scripts capture it), progress and a summary on
//! stderr. Exit status: 0 imported (or found), 1 failed, 2 usage error (bad arguments, file
//! missing or not the format given, credentials not set).
//!
//! Here: the command line, the checks made before anything is sent, errors and exit status;
//! in [`import`]: the run against OSS and ECS.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sync_aliyun::ecs::{EcsError, ErrorKind, Tag};
use sync_aliyun::oss::OssError;
use sync_aliyun::Credentials;
use sync_common::publish::{self as shared, ImageFormat, USAGE_EXIT};

use import::Plan;

mod import;

const NAME: &str = "sync-aliyun-image";
const MIB: u64 = 1 << 20;

#[derive(Debug, Parser)]
#[command(
    name = NAME,
    version,
    about = "Uploads a disk image to OSS and imports it as an ECS image",
    after_help = "Credentials: ALIBABA_CLOUD_ACCESS_KEY_ID, ALIBABA_CLOUD_ACCESS_KEY_SECRET, \
                  optional ALIBABA_CLOUD_SECURITY_TOKEN (STS).\n\
                  Exit status: 0 ok, 1 failure, 2 usage error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Upload FILE to oss://BUCKET/KEY, import it with ImportImage, wait until it is
    /// Available, and print its id.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// Disk image to upload.
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// OSS bucket, in the same region as the image (ECS imports only from there).
    #[arg(long, value_name = "BUCKET")]
    bucket: String,
    /// Object key the file is uploaded to.
    #[arg(long, value_name = "OBJECT_KEY")]
    key: String,
    /// Name of the new image (2–128 characters: a letter, then letters, digits, `.:_-`).
    #[arg(long, value_name = "NAME")]
    image_name: String,
    /// Region id, e.g. cn-hangzhou.
    #[arg(long, value_name = "REGION")]
    region: String,
    /// Image format; by default from the extension (.raw/.img, .qcow2, .vhd).
    #[arg(long, value_enum, ignore_case = true)]
    format: Option<Format>,
    /// Firmware the image boots with (the appliance is UEFI-only).
    #[arg(long, value_enum, ignore_case = true, default_value_t = BootMode::Uefi)]
    boot_mode: BootMode,
    /// Operating system distribution, as ECS names it.
    #[arg(long, value_name = "PLATFORM", default_value = "Debian")]
    platform: String,
    /// Image description.
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// Image tag; repeatable (at most 20).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<Tag>,
    /// ECS endpoint; default https://ecs.REGION.aliyuncs.com.
    #[arg(long, value_name = "URL")]
    ecs_endpoint: Option<String>,
    /// OSS endpoint; default https://oss-REGION.aliyuncs.com.
    #[arg(long, value_name = "URL")]
    oss_endpoint: Option<String>,
    /// Multipart part size; a file larger than one part goes by multipart, so a failed
    /// part is sent again rather than the whole image.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=5120))]
    part_size_mib: u64,
    /// How long to wait for the image to become Available (the upload not included).
    #[arg(long, value_name = "N", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,
    /// Keep the object in OSS after the import (it is deleted by default).
    #[arg(long)]
    keep_object: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Raw,
    Qcow2,
    Vhd,
}

impl Format {
    /// The value of `DiskDeviceMapping.1.Format`.
    fn ecs_name(self) -> &'static str {
        match self {
            Format::Raw => "RAW",
            Format::Qcow2 => "QCOW2",
            Format::Vhd => "VHD",
        }
    }

    fn sniffed(found: ImageFormat) -> Self {
        match found {
            ImageFormat::Raw => Format::Raw,
            ImageFormat::Qcow2 => Format::Qcow2,
            ImageFormat::Vhd => Format::Vhd,
        }
    }

    fn from_extension(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "raw" | "img" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            "vhd" => Some(Format::Vhd),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BootMode {
    #[value(name = "UEFI")]
    Uefi,
    #[value(name = "BIOS")]
    Bios,
}

impl BootMode {
    fn ecs_name(self) -> &'static str {
        match self {
            BootMode::Uefi => "UEFI",
            BootMode::Bios => "BIOS",
        }
    }
}

/// Why a run failed; `main` prints the chain once and maps it to the exit status.
#[derive(Debug, thiserror::Error)]
enum ImageError {
    /// Wrong arguments or environment, found before anything was sent (exit 2).
    #[error("{0}")]
    Usage(String),
    #[error("{context}")]
    Ecs {
        context: String,
        #[source]
        source: Box<EcsError>,
    },
    #[error("{context}")]
    Oss {
        context: String,
        #[source]
        source: Box<OssError>,
    },
    #[error("{0}")]
    Failed(String),
}

impl ImageError {
    fn ecs(context: impl Into<String>) -> impl FnOnce(EcsError) -> Self {
        let context = context.into();
        move |source| ImageError::Ecs {
            context,
            source: Box::new(source),
        }
    }

    fn oss(context: impl Into<String>) -> impl FnOnce(OssError) -> Self {
        let context = context.into();
        move |source| ImageError::Oss {
            context,
            source: Box::new(source),
        }
    }

    fn exit_code(&self) -> ExitCode {
        match self {
            ImageError::Usage(_) => ExitCode::from(USAGE_EXIT),
            _ => ExitCode::FAILURE,
        }
    }

    /// What to look at when the clouds refused the credentials.
    fn hint(&self) -> Option<&'static str> {
        let refused = match self {
            ImageError::Ecs { source, .. } => source.kind() == ErrorKind::Unauthenticated,
            ImageError::Oss { source, .. } => source.code().is_some_and(|c| {
                matches!(
                    c,
                    "InvalidAccessKeyId"
                        | "SignatureDoesNotMatch"
                        | "InvalidSecurityToken"
                        | "SecurityTokenExpired"
                        | "RequestTimeTooSkewed"
                )
            }),
            _ => false,
        };
        refused.then_some(
            "the credentials were refused: check ALIBABA_CLOUD_ACCESS_KEY_ID, \
             ALIBABA_CLOUD_ACCESS_KEY_SECRET, ALIBABA_CLOUD_SECURITY_TOKEN (needed with an \
             STS key, and not expired) and this machine's clock",
        )
    }
}

fn main() -> ExitCode {
    let cli: Cli = match shared::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    shared::init_logging("SYNC_ALIYUN_IMAGE_LOG");
    let Command::Import(args) = cli.command;
    shared::finish(
        NAME,
        run(args),
        |e: &ImageError| e.hint().map(str::to_string),
        ImageError::exit_code,
    )
}

fn run(args: ImportArgs) -> Result<String, ImageError> {
    let plan = Plan::new(args)?;
    let credentials = credentials_from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ImageError::Failed(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(plan.execute(credentials))
}

/// Reads the credentials from the environment; unset and empty are the same.
fn credentials_from_env() -> Result<Credentials, ImageError> {
    let var = |name: &str| match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(Some(v)),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(ImageError::Usage(format!("{name} is not valid UTF-8")))
        }
    };
    let missing = |name: &str| {
        ImageError::Usage(format!(
            "{name} is not set: export ALIBABA_CLOUD_ACCESS_KEY_ID and \
             ALIBABA_CLOUD_ACCESS_KEY_SECRET (and ALIBABA_CLOUD_SECURITY_TOKEN for STS \
             credentials), as for the Alibaba Cloud CLI"
        ))
    };
    let id = var("ALIBABA_CLOUD_ACCESS_KEY_ID")?
        .ok_or_else(|| missing("ALIBABA_CLOUD_ACCESS_KEY_ID"))?;
    let secret = var("ALIBABA_CLOUD_ACCESS_KEY_SECRET")?
        .ok_or_else(|| missing("ALIBABA_CLOUD_ACCESS_KEY_SECRET"))?;
    let token = var("ALIBABA_CLOUD_SECURITY_TOKEN")?;
    Ok(Credentials::new(id, secret, token))
}

fn parse_tag(s: &str) -> Result<Tag, String> {
    shared::parse_tag(s).map(|(k, v)| Tag::new(k, v))
}

/// ECS's rule for image names: 2–128 characters, a letter first, then letters, digits and
/// `.:_-`, not a URL. Checked here so that a bad name fails before a long upload.
fn check_image_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = (2..=128).contains(&name.chars().count())
        && chars.next().is_some_and(char::is_alphabetic)
        && chars.all(|c| c.is_alphanumeric() || ".:_-".contains(c))
        && !name.starts_with("http:")
        && !name.starts_with("https:");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--image-name {name:?}: ECS wants 2-128 characters, a letter first, then letters, \
             digits, '.', ':', '_' or '-'"
        ))
    }
}

/// OSS's rule for object keys: 1–1023 bytes, not starting with `/` or `\`.
fn check_object_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 1023 || key.starts_with(['/', '\\']) {
        return Err(format!(
            "--key {key:?}: OSS wants 1-1023 bytes, not starting with '/' or '\\'"
        ));
    }
    Ok(())
}

/// The ImportImage `ClientToken` of an import: the same for the same region, image name and
/// object, so a retried or rerun call answers the first image instead of making a second.
fn client_token(region: &str, name: &str, bucket: &str, key: &str) -> String {
    shared::client_token(&[region, name, bucket, key])
}

fn note(line: &str) {
    eprintln!("{NAME}: {line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_extensions() {
        assert_eq!(
            Format::from_extension(Path::new("a/b.RAW")),
            Some(Format::Raw)
        );
        assert_eq!(
            Format::from_extension(Path::new("b.img")),
            Some(Format::Raw)
        );
        assert_eq!(
            Format::from_extension(Path::new("b.qcow2")),
            Some(Format::Qcow2)
        );
        assert_eq!(
            Format::from_extension(Path::new("b.vhd")),
            Some(Format::Vhd)
        );
        assert_eq!(Format::from_extension(Path::new("b.iso")), None);
        assert_eq!(Format::from_extension(Path::new("b")), None);
    }

    #[test]
    fn names_keys_and_tags_are_checked() {
        assert!(check_image_name("sync-gateway-0.1.0").is_ok());
        assert!(check_image_name("a").is_err());
        assert!(check_image_name("1abc").is_err());
        assert!(check_image_name("has space").is_err());
        assert!(check_image_name(&"a".repeat(129)).is_err());
        assert!(check_object_key("images/x.raw").is_ok());
        assert!(check_object_key("/x").is_err());
        assert!(check_object_key("").is_err());
        assert_eq!(parse_tag("k=v=w"), Ok(Tag::new("k", "v=w")));
        assert_eq!(parse_tag("k="), Ok(Tag::new("k", "")));
        assert!(parse_tag("=v").is_err() && parse_tag("kv").is_err());
    }

    #[test]
    fn client_tokens_are_stable_and_distinct() {
        let t = client_token("cn-hangzhou", "img", "b", "k");
        assert_eq!(t, client_token("cn-hangzhou", "img", "b", "k"));
        assert!(t.len() <= 64 && t.is_ascii());
        assert_ne!(t, client_token("cn-hangzhou", "img", "b", "k2"));
        assert_ne!(t, client_token("cn-hangzhou", "im", "gb", "k"));
    }
}
