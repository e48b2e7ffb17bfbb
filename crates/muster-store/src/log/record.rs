//! On-disk framing shared by log segments and the metadata file.
//!
//! A record is `[u32 payload length, LE][u32 CRC-32 of the payload, LE][payload]`. The length
//! lets recovery find the next record; the checksum tells a torn or rotted record from a good
//! one, so recovery can cut the log at the first record that was not completely written.
//!
//! A log entry's payload is never empty, so a header of zeros is not a record: it is where
//! the records end in a segment file extended with zeros ahead of them (`writer.rs`).

use std::path::{Path, PathBuf};

/// Bytes in a record header: payload length and payload checksum.
pub(crate) const HEADER_LEN: usize = 8;

/// Prefix and suffix of segment file names: `seg-{first_index:020}.log`.
const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".log";

/// Appends one framed record holding `payload` to `out`.
///
/// Returns `None` when the payload does not fit the 32-bit length field.
pub(crate) fn encode_record(payload: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let len = u32::try_from(payload.len()).ok()?;
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Some(())
}

/// What [`decode_record`] found at an offset.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// A complete record whose checksum matches; the next record starts at `next`.
    Record { payload: &'a [u8], next: usize },
    /// The buffer ends here, or holds a header of zeros here: the end of the records.
    End,
    /// The bytes here are not a valid record: the file was cut mid-record or is damaged.
    Bad(BadRecord),
}

/// Why the bytes at an offset are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadRecord {
    /// Fewer than [`HEADER_LEN`] bytes remain.
    TornHeader,
    /// The header names more payload bytes than remain.
    TornPayload,
    /// The payload does not match its checksum.
    Checksum,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BadRecord::TornHeader => "file ends inside a record header",
            BadRecord::TornPayload => "file ends inside a record payload",
            BadRecord::Checksum => "record checksum mismatch",
        })
    }
}

/// Decodes the record that starts at `offset` in `buf`, checking its length and checksum.
pub(crate) fn decode_record(buf: &[u8], offset: usize) -> Decoded<'_> {
    let rest = match buf.get(offset..) {
        Some(rest) => rest,
        None => return Decoded::Bad(BadRecord::TornHeader),
    };
    if rest.iter().take(HEADER_LEN).all(|&b| b == 0) {
        return Decoded::End;
    }
    let (Some(len), Some(crc)) = (read_u32(rest, 0), read_u32(rest, 4)) else {
        return Decoded::Bad(BadRecord::TornHeader);
    };
    let Ok(len) = usize::try_from(len) else {
        return Decoded::Bad(BadRecord::TornPayload);
    };
    let Some(payload) = HEADER_LEN.checked_add(len).and_then(|end| rest.get(HEADER_LEN..end)) else {
        return Decoded::Bad(BadRecord::TornPayload);
    };
    if crc32fast::hash(payload) != crc {
        return Decoded::Bad(BadRecord::Checksum);
    }
    Decoded::Record {
        payload,
        next: offset + HEADER_LEN + len,
    }
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// The file name of the segment whose first entry has index `first_index`.
pub(crate) fn segment_file_name(first_index: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_index:020}{SEGMENT_SUFFIX}")
}

/// The path of the segment whose first entry has index `first_index`.
pub(crate) fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(segment_file_name(first_index))
}

/// Parses a segment file name back into its first index; `None` for any other file.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SEGMENT_PREFIX)?.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_damage() {
        let mut buf = Vec::new();
        encode_record(b"hello", &mut buf).unwrap();
        encode_record(b"x", &mut buf).unwrap();
        let Decoded::Record { payload, next } = decode_record(&buf, 0) else {
            panic!("first record")
        };
        assert_eq!(payload, b"hello");
        let Decoded::Record { payload, next } = decode_record(&buf, next) else {
            panic!("second record")
        };
        assert_eq!(payload, b"x");
        assert_eq!(decode_record(&buf, next), Decoded::End);
        // A header of zeros (an empty payload, or zeros written ahead of the records)
        // ends the records.
        assert_eq!(decode_record(&[0; 20], 0), Decoded::End);
        assert_eq!(decode_record(&[0; 3], 0), Decoded::End);

        assert_eq!(decode_record(&buf[..5], 0), Decoded::Bad(BadRecord::TornHeader));
        assert_eq!(decode_record(&buf[..10], 0), Decoded::Bad(BadRecord::TornPayload));
        let mut flipped = buf.clone();
        flipped[9] ^= 0x40;
        assert_eq!(decode_record(&flipped, 0), Decoded::Bad(BadRecord::Checksum));
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_file_name(42), "seg-00000000000000000042.log");
        assert_eq!(parse_segment_file_name("seg-00000000000000000042.log"), Some(42));
        assert_eq!(parse_segment_file_name(&segment_file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_file_name("seg-42.log"), None);
        assert_eq!(parse_segment_file_name("meta"), None);
        assert_eq!(parse_segment_file_name("seg-0000000000000000004x.log"), None);
    }
}
