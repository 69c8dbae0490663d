//! `sync-aws-image`: publishes the appliance's raw disk image as an AMI. The file becomes an EBS
//! snapshot through the EBS direct API (only its non-zero 512 KiB blocks are sent, so a 2 GiB
//! image with 400 MiB of data sends 400 MiB), and the snapshot an x86_64 UEFI AMI with ENA;
//! `scripts/publish-aws` runs it.
//!
//! ```text
//! sync-aws-image publish --file RAW --name AMI_NAME --region R
//!     [--description TEXT] [--tag KEY=VALUE]... [--ec2-endpoint URL] [--ebs-endpoint URL]
//!     [--concurrency N] [--timeout-secs N]
//! ```
//!
//! ```text
//! check args, file, credentials ──▶ read the file once: SHA-256, which blocks hold data
//!   ──▶ DescribeImages: NAME there? ──yes, from this file──▶ print its id (a rerun)
//!             │ no                  ──yes, from another──▶ refuse (exit 1)
//!             ▼
//!   DescribeSnapshots tagged with the SHA-256: one completed? ──yes──▶ reuse it
//!             │ no
//!             ▼
//!   StartSnapshot (ClientToken from the SHA-256) ──▶ PutSnapshotBlock × data blocks
//!   ──▶ CompleteSnapshot (LINEAR checksum) ──▶ DescribeSnapshots until completed
//!   ──▶ RegisterImage (x86_64, uefi, ENA, /dev/xvda, gp3) ──▶ DescribeImages until available
//! ```
//!
//! Credentials come only from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and, for temporary
//! credentials, `AWS_SESSION_TOKEN`: no profile files, never the instance metadata service.
//! Endpoints only from `--ec2-endpoint`/`--ebs-endpoint` (default: the region's);
//! `scripts/publish-aws` maps `AWS_ENDPOINT_URL_EC2`/`AWS_ENDPOINT_URL_EBS` onto them.
//!
//! Reruns are cheap and safe: the image and its snapshot carry the file's SHA-256
//! ([`DIGEST_TAG`]); an image of the same name from the same file is answered, not made
//! again; a completed snapshot of the same file is reused (a run that failed after the upload
//! uploads nothing the next time); StartSnapshot's `ClientToken` is derived from the SHA-256,
//! so a retried call whose answer was lost starts no second snapshot.
//!
//! Output: the AMI id alone on stdout (scripts capture it), progress and a summary on stderr.
//! Exit status: 0 published (or found), 1 failed (credentials missing or refused included),
//! 2 usage error (bad arguments, a file that is not a raw image).
//!
//! Here: the command line, the checks made before anything is sent, errors and exit status;
//! in [`publish`]: the run against EC2 and EBS; in [`upload`]: the block upload.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sync_aws::{AwsError, ErrorKind, StaticCredentials};
use sync_common::publish::{self as shared, DIGEST_TAG, USAGE_EXIT};

use publish::Plan;

mod publish;
mod upload;

const NAME: &str = "sync-aws-image";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Largest EBS volume (io2 Block Express), so the largest snapshot StartSnapshot takes.
const MAX_VOLUME_GIB: u64 = 65_536;
/// Tags per EC2 resource; the tool adds [`DIGEST_TAG`] to the ones given.
const MAX_TAGS: usize = 50;

#[derive(Debug, Parser)]
#[command(
    name = NAME,
    version,
    about = "Uploads a raw disk image as an EBS snapshot and registers it as a UEFI AMI",
    after_help = "Credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional \
                  AWS_SESSION_TOKEN (never a profile or the metadata service).\n\
                  Exit status: 0 ok, 1 failure, 2 usage error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Upload FILE as an EBS snapshot, register it as AMI NAME, wait until it is available,
    /// and print its id.
    Publish(PublishArgs),
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// Raw disk image (x86_64, GPT, UEFI-bootable).
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// AMI name (3-128 characters: letters, digits, ( ) [ ] space . / - ' @ _), unique in the
    /// account and region.
    #[arg(long, value_name = "AMI_NAME")]
    name: String,
    /// Region, e.g. eu-central-1.
    #[arg(long, value_name = "REGION")]
    region: String,
    /// Description of the AMI and its snapshot (at most 255 characters).
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// Tag of the AMI and its snapshot; repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = shared::parse_tag)]
    tags: Vec<(String, String)>,
    /// EC2 endpoint; default https://ec2.REGION.amazonaws.com.
    #[arg(long, value_name = "URL")]
    ec2_endpoint: Option<String>,
    /// EBS direct API endpoint; default https://ebs.REGION.amazonaws.com.
    #[arg(long, value_name = "URL")]
    ebs_endpoint: Option<String>,
    /// Blocks uploaded at once (512 KiB each).
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    /// How long to wait for the snapshot to complete and the AMI to become available (the
    /// upload not included).
    #[arg(long, value_name = "N", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,
}

/// Why a run failed; `main` prints the chain once and maps it to the exit status.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    /// Wrong arguments or file, found before anything was sent (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Credentials missing from the environment (exit 1).
    #[error("{0}")]
    Credentials(String),
    #[error("{context}")]
    Aws {
        context: String,
        #[source]
        source: Box<AwsError>,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

impl PublishError {
    fn aws(context: impl Into<String>) -> impl FnOnce(AwsError) -> Self {
        let context = context.into();
        move |source| PublishError::Aws {
            context,
            source: Box::new(source),
        }
    }

    fn exit_code(&self) -> ExitCode {
        match self {
            PublishError::Usage(_) => ExitCode::from(USAGE_EXIT),
            _ => ExitCode::FAILURE,
        }
    }

    /// What to look at when AWS refused the credentials or the call.
    fn hint(&self) -> Option<String> {
        let PublishError::Aws { source, .. } = self else {
            return None;
        };
        match (&source.kind, source.code.as_deref()) {
            (ErrorKind::AccessDenied { action }, _) => Some(format!(
                "these credentials may not do {action}: scripts/publish-aws lists the \
                 permissions sync-aws-image needs"
            )),
            (
                _,
                Some(
                    "AuthFailure"
                    | "UnrecognizedClientException"
                    | "InvalidClientTokenId"
                    | "InvalidSignatureException"
                    | "SignatureDoesNotMatch"
                    | "ExpiredToken"
                    | "ExpiredTokenException"
                    | "RequestExpired",
                ),
            ) => Some(
                "the credentials were refused: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, \
                 AWS_SESSION_TOKEN (needed with temporary keys, and not expired) and this \
                 machine's clock"
                    .into(),
            ),
            _ => None,
        }
    }
}

fn main() -> ExitCode {
    let cli: Cli = match shared::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    shared::init_logging("SYNC_AWS_IMAGE_LOG");
    let Command::Publish(args) = cli.command;
    shared::finish(
        NAME,
        run(args),
        |e: &PublishError| e.hint(),
        PublishError::exit_code,
    )
}

fn run(args: PublishArgs) -> Result<String, PublishError> {
    let plan = Plan::new(args)?;
    let credentials = credentials_from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| PublishError::Failed(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(plan.execute(&credentials))
}

/// Reads the credentials from the environment; unset and empty are the same.
fn credentials_from_env() -> Result<StaticCredentials, PublishError> {
    let var = |name: &str| match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(Some(v)),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(PublishError::Credentials(format!(
            "{name} is not valid UTF-8"
        ))),
    };
    let missing = |name: &str| {
        PublishError::Credentials(format!(
            "{name} is not set: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and \
             AWS_SESSION_TOKEN for temporary credentials); {NAME} reads no profile and never \
             the instance metadata service"
        ))
    };
    Ok(StaticCredentials {
        access_key_id: var("AWS_ACCESS_KEY_ID")?.ok_or_else(|| missing("AWS_ACCESS_KEY_ID"))?,
        secret_access_key: var("AWS_SECRET_ACCESS_KEY")?
            .ok_or_else(|| missing("AWS_SECRET_ACCESS_KEY"))?,
        session_token: var("AWS_SESSION_TOKEN")?,
    })
}

/// EC2's rule for AMI names: 3–128 characters of letters, digits and `()[] ./-'@_`. Checked
/// here so that a bad name fails before a long upload.
fn check_ami_name(name: &str) -> Result<(), String> {
    let ok = (3..=128).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--name {name:?}: EC2 wants 3-128 characters of letters, digits, spaces and \
             ( ) [ ] . / - ' @ _"
        ))
    }
}

/// A region id as AWS spells them: lowercase letters, digits and dashes.
fn check_region(region: &str) -> Result<(), String> {
    let ok = !region.is_empty()
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--region {region:?}: not a region id like eu-central-1"
        ))
    }
}

/// EC2's tag rules (key 1–128 characters, not `aws:`, value at most 256), the key this tool
/// sets itself refused, and at most [`MAX_TAGS`] with it.
fn check_tags(tags: &[(String, String)]) -> Result<(), String> {
    if tags.len() >= MAX_TAGS {
        return Err(format!(
            "{} tags given; EC2 takes {MAX_TAGS} per resource and {NAME} adds {DIGEST_TAG}",
            tags.len()
        ));
    }
    for (k, v) in tags {
        if k.chars().count() > 128 || v.chars().count() > 256 {
            return Err(format!("--tag {k}=…: keys take 128 characters, values 256"));
        }
        if k.to_ascii_lowercase().starts_with("aws:") {
            return Err(format!("--tag {k}=…: the aws: prefix is AWS's own"));
        }
        if k == DIGEST_TAG {
            return Err(format!("--tag {k}=…: {NAME} sets {DIGEST_TAG} itself"));
        }
    }
    Ok(())
}

/// An endpoint must be an http(s) URL with a host.
fn check_endpoint(flag: &str, url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => Ok(()),
        _ => Err(format!("{flag} {url:?}: not an http(s) URL")),
    }
}

fn note(line: &str) {
    eprintln!("{NAME}: {line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_regions_tags_and_endpoints_are_checked() {
        assert!(check_ami_name("sync-gateway-0.1.0-abc1234").is_ok());
        assert!(check_ami_name("Gateway (test) [x] @ 1/2 'q'_").is_ok());
        assert!(check_ami_name("ab").is_err());
        assert!(check_ami_name(&"a".repeat(129)).is_err());
        assert!(check_ami_name("semi;colon").is_err());
        assert!(check_ami_name("ünïcode-name").is_err());
        assert!(check_region("eu-central-1").is_ok());
        assert!(check_region("EU Central").is_err() && check_region("").is_err());
        let tag = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert!(check_tags(&tag("team", "release")).is_ok());
        assert!(check_tags(&tag("aws:cloudformation", "x")).is_err());
        assert!(check_tags(&tag(DIGEST_TAG, "x")).is_err());
        assert!(check_tags(&tag(&"k".repeat(129), "x")).is_err());
        assert!(check_tags(&vec![("k".into(), "v".into()); MAX_TAGS]).is_err());
        assert!(check_tags(&vec![("k".into(), "v".into()); MAX_TAGS - 1]).is_ok());
        assert!(check_endpoint("--ec2-endpoint", "http://127.0.0.1:5000").is_ok());
        assert!(check_endpoint("--ec2-endpoint", "https://ec2.example").is_ok());
        assert!(check_endpoint("--ec2-endpoint", "ftp://127.0.0.1").is_err());
        assert!(check_endpoint("--ec2-endpoint", "http://").is_err());
    }
}
