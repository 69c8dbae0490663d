//! How a replicated disk boots, read from its partition table: what a cloud launch needs to
//! register the image (`BootMode=uefi` or `legacy-bios`).
//!
//! | partition table | boots with |
//! |---|---|
//! | GPT with an EFI System Partition | UEFI |
//! | GPT with a BIOS boot partition and no ESP | legacy BIOS (GRUB's `bios_grub`) |
//! | MBR with an active partition, or MBR type 0xEF (ESP) | legacy BIOS, UEFI for 0xEF |
//! | none of these | unknown: the launch uses the configured mode |
//!
//! Only the first 34 sectors are read (protective MBR, GPT header, 128 entries of 128 bytes),
//! and every field read from the disk is range-checked: the disk is the source's, not ours.

use std::io;

/// Boot firmware an image needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMode {
    Uefi,
    LegacyBios,
}

impl BootMode {
    /// The mode a `boot_mode` setting fixes; `None` for `detect`.
    pub fn configured(setting: sync_common::boot::BootModeSetting) -> Option<BootMode> {
        use sync_common::boot::BootModeSetting as S;
        match setting {
            S::Uefi => Some(BootMode::Uefi),
            S::LegacyBios => Some(BootMode::LegacyBios),
            S::Detect => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BootMode::Uefi => "uefi",
            BootMode::LegacyBios => "legacy-bios",
        }
    }
}

const SECTOR: usize = 512;
/// EFI System Partition, C12A7328-F81F-11D2-BA4B-00A0C93EC93B in GPT's mixed-endian layout.
const ESP_GUID: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];
/// BIOS boot partition, 21686148-6449-6E6F-744E-656564454649.
const BIOS_BOOT_GUID: [u8; 16] = [
    0x48, 0x61, 0x68, 0x21, 0x49, 0x64, 0x6f, 0x6e, 0x74, 0x4e, 0x65, 0x65, 0x64, 0x45, 0x46, 0x49,
];

/// Bytes [`detect`] needs from the start of the disk.
pub const HEAD_LEN: usize = 34 * SECTOR;

/// Reads the head of a disk through `read_at(buf, offset)` and detects its boot mode.
pub fn detect_from(
    mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<()>,
    disk_size: u64,
) -> io::Result<Option<BootMode>> {
    let len = HEAD_LEN.min(disk_size as usize);
    let mut head = vec![0u8; len];
    read_at(&mut head, 0)?;
    Ok(detect(&head))
}

/// The boot mode a disk whose first sectors are `head` needs, if the table says.
pub fn detect(head: &[u8]) -> Option<BootMode> {
    if head.len() < 2 * SECTOR || head[510] != 0x55 || head[511] != 0xaa {
        return None;
    }
    let mbr_entries = (0..4).map(|i| &head[446 + i * 16..446 + (i + 1) * 16]);
    let mut protective = false;
    let mut active = false;
    let mut mbr_esp = false;
    for e in mbr_entries {
        match e[4] {
            0xee => protective = true,
            0xef => mbr_esp = true,
            0 => continue,
            _ => {}
        }
        if e[0] == 0x80 {
            active = true;
        }
    }
    if protective {
        return detect_gpt(head);
    }
    if mbr_esp {
        Some(BootMode::Uefi)
    } else if active {
        Some(BootMode::LegacyBios)
    } else {
        None
    }
}

fn detect_gpt(head: &[u8]) -> Option<BootMode> {
    let hdr = &head[SECTOR..2 * SECTOR];
    if &hdr[0..8] != b"EFI PART" {
        return None;
    }
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let entries_lba = u64_at(hdr, 72);
    let count = u32_at(hdr, 80) as usize;
    let entry_size = u32_at(hdr, 84) as usize;
    if !(128..=4096).contains(&entry_size) || !entry_size.is_power_of_two() {
        return None;
    }
    let start = usize::try_from(entries_lba).ok()?.checked_mul(SECTOR)?;
    let mut bios_boot = false;
    for i in 0..count.min(1024) {
        let off = start.checked_add(i.checked_mul(entry_size)?)?;
        let Some(entry) = head.get(off..off + 16) else {
            break; // beyond what was read: the usual 128 entries fit in 34 sectors
        };
        if entry == ESP_GUID {
            return Some(BootMode::Uefi);
        }
        if entry == BIOS_BOOT_GUID {
            bios_boot = true;
        }
    }
    bios_boot.then_some(BootMode::LegacyBios)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mbr(parts: &[(u8, u8)]) -> Vec<u8> {
        let mut d = vec![0u8; HEAD_LEN];
        for (i, (boot, kind)) in parts.iter().enumerate() {
            d[446 + i * 16] = *boot;
            d[446 + i * 16 + 4] = *kind;
        }
        d[510] = 0x55;
        d[511] = 0xaa;
        d
    }

    fn gpt(types: &[[u8; 16]]) -> Vec<u8> {
        let mut d = mbr(&[(0, 0xee)]);
        let h = SECTOR;
        d[h..h + 8].copy_from_slice(b"EFI PART");
        d[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        d[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        d[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            let o = 2 * SECTOR + i * 128;
            d[o..o + 16].copy_from_slice(t);
        }
        d
    }

    const LINUX_FS: [u8; 16] = [
        0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d,
        0xe4,
    ];

    #[test]
    fn gpt_with_an_esp_boots_uefi() {
        assert_eq!(detect(&gpt(&[LINUX_FS, ESP_GUID])), Some(BootMode::Uefi));
    }

    #[test]
    fn gpt_with_a_bios_boot_partition_boots_legacy() {
        assert_eq!(
            detect(&gpt(&[BIOS_BOOT_GUID, LINUX_FS])),
            Some(BootMode::LegacyBios)
        );
        assert_eq!(detect(&gpt(&[LINUX_FS])), None);
    }

    #[test]
    fn mbr_tables() {
        assert_eq!(detect(&mbr(&[(0x80, 0x83)])), Some(BootMode::LegacyBios));
        assert_eq!(detect(&mbr(&[(0, 0xef), (0, 0x83)])), Some(BootMode::Uefi));
        assert_eq!(detect(&mbr(&[(0, 0x83)])), None);
        assert_eq!(detect(&vec![0u8; HEAD_LEN]), None, "no signature");
    }

    #[test]
    fn hostile_headers_do_not_panic() {
        let mut d = gpt(&[ESP_GUID]);
        // Entry array far outside, huge counts, odd sizes, short input.
        d[SECTOR + 72..SECTOR + 80].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(detect(&d), None);
        let mut d = gpt(&[ESP_GUID]);
        d[SECTOR + 84..SECTOR + 88].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(detect(&d), None);
        let mut d = gpt(&[ESP_GUID]);
        d[SECTOR + 80..SECTOR + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(detect(&d), Some(BootMode::Uefi));
        assert_eq!(detect(&gpt(&[ESP_GUID])[..600]), None);
        assert_eq!(detect(&[]), None);
    }

    #[test]
    fn a_real_sfdisk_table_is_read() {
        // A GPT made by sfdisk on a sparse file, when sfdisk is here (it is on Debian).
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let script = "label: gpt\nsize=16MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n";
        let out = std::process::Command::new("sfdisk")
            .arg("--quiet")
            .arg(&img)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait()
            });
        match out {
            Ok(s) if s.success() => {}
            other => {
                panic!("sfdisk is needed (scripts/test installs the fdisk package): {other:?}")
            }
        }
        let f = std::fs::File::open(&img).unwrap();
        let got = detect_from(
            |buf, off| std::os::unix::fs::FileExt::read_exact_at(&f, buf, off),
            64 << 20,
        )
        .unwrap();
        assert_eq!(got, Some(BootMode::Uefi));
    }
}
