//! How a cloud backend's launches choose the boot mode of their image (both clouds' settings
//! carry the same key, `boot_mode`).

use serde::{Deserialize, Serialize};

/// Boot mode of launched images: fixed, or detected from the boot disk's partition table
/// (GPT or MBR with an EFI system partition: UEFI; else legacy BIOS) by the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootModeSetting {
    /// Always UEFI.
    Uefi,
    /// Always legacy BIOS.
    LegacyBios,
    /// Decide per launch from the boot disk.
    #[default]
    Detect,
}
