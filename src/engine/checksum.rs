//! The payload checksum of an arrival, read in place.

use crate::proto::HEADER_LEN;
use crate::transport::Region;

/// The CRC32C `crc` extended over `[base + HEADER_LEN, base + len)` of
/// `region`. Read in place: the arrival has announced these bytes, which
/// hands them to this rank (no writer touches them until it answers), the
/// same rule that makes a batch's views sound (`Region` docs).
pub(super) fn region_crc(region: &Region, base: usize, len: u64, crc: u32) -> Result<u32, String> {
    crc_of(
        region,
        base + HEADER_LEN,
        len.saturating_sub(HEADER_LEN as u64),
        crc,
    )
}

/// The CRC32C `crc` extended over `[at, at + len)` of `region` (read in
/// place, as [`region_crc`] says).
pub(super) fn crc_of(region: &Region, at: usize, len: u64, crc: u32) -> Result<u32, String> {
    let len = usize::try_from(len).map_err(|_| "message length overflows".to_string())?;
    Ok(crc32c::crc32c_append(crc, region.slice(at, len)?))
}
