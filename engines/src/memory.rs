//! Checked access to a guest's linear memory.

use core::fmt;
use filterbox_abi::Status;

/// Why a guest memory access or allocation failed. Every variant maps to
/// [`Status::InvalidMemoryAccess`] at the ABI boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryError {
    /// `[ptr, ptr + len)` is not inside the memory.
    OutOfBounds {
        /// Start of the range.
        ptr: u32,
        /// Length of the range.
        len: u32,
        /// Size of the memory in bytes.
        size: usize,
    },
    /// The module exports no linear memory named `memory`.
    NoMemory,
    /// The guest allocator returned 0.
    AllocatorFailed {
        /// The size asked for.
        size: u32,
    },
    /// The guest allocator trapped; the instance is failed.
    AllocatorTrapped,
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::OutOfBounds { ptr, len, size } => {
                write!(
                    f,
                    "guest range {ptr:#x}+{len} is outside memory of {size} bytes"
                )
            }
            MemoryError::NoMemory => f.write_str("module exports no memory"),
            MemoryError::AllocatorFailed { size } => {
                write!(f, "guest allocator returned 0 for {size} bytes")
            }
            MemoryError::AllocatorTrapped => f.write_str("guest allocator trapped"),
        }
    }
}

impl std::error::Error for MemoryError {}

impl From<MemoryError> for Status {
    fn from(_: MemoryError) -> Status {
        Status::InvalidMemoryAccess
    }
}

/// A borrowed view of a guest's linear memory where every access is bounds-checked with
/// 64-bit arithmetic, so no `(ptr, len)` a guest passes can overflow or reach outside it.
pub struct GuestMemory<'a> {
    bytes: &'a mut [u8],
}

impl<'a> GuestMemory<'a> {
    /// Wraps the bytes of a linear memory.
    pub fn new(bytes: &'a mut [u8]) -> Self {
        GuestMemory { bytes }
    }

    /// A view of no memory at all: every non-empty access fails.
    pub fn empty() -> GuestMemory<'static> {
        GuestMemory { bytes: &mut [] }
    }

    /// Size of the memory in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the memory has no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn range(&self, ptr: u32, len: u32) -> Result<core::ops::Range<usize>, MemoryError> {
        let end = u64::from(ptr) + u64::from(len);
        if end > self.bytes.len() as u64 {
            return Err(MemoryError::OutOfBounds {
                ptr,
                len,
                size: self.bytes.len(),
            });
        }
        // Both fit in usize: end <= bytes.len().
        Ok(ptr as usize..end as usize)
    }

    /// `len` bytes at `ptr`. `(0, 0)` is a valid empty slice, as the SDKs rely on.
    pub fn read(&self, ptr: u32, len: u32) -> Result<&[u8], MemoryError> {
        let range = self.range(ptr, len)?;
        Ok(&self.bytes[range])
    }

    /// `len` writable bytes at `ptr`.
    pub fn read_mut(&mut self, ptr: u32, len: u32) -> Result<&mut [u8], MemoryError> {
        let range = self.range(ptr, len)?;
        Ok(&mut self.bytes[range])
    }

    /// Copies `data` to `ptr`.
    pub fn write(&mut self, ptr: u32, data: &[u8]) -> Result<(), MemoryError> {
        let len = u32::try_from(data.len()).map_err(|_| MemoryError::OutOfBounds {
            ptr,
            len: u32::MAX,
            size: self.bytes.len(),
        })?;
        self.read_mut(ptr, len)?.copy_from_slice(data);
        Ok(())
    }

    /// A little-endian `u32` at `ptr`.
    pub fn read_u32(&self, ptr: u32) -> Result<u32, MemoryError> {
        let mut word = [0; 4];
        word.copy_from_slice(self.read(ptr, 4)?);
        Ok(u32::from_le_bytes(word))
    }

    /// Writes a little-endian `u32` (the ABI's "word") at `ptr`.
    pub fn write_u32(&mut self, ptr: u32, value: u32) -> Result<(), MemoryError> {
        self.write(ptr, &value.to_le_bytes())
    }

    /// Writes a little-endian `u64` at `ptr`.
    pub fn write_u64(&mut self, ptr: u32, value: u64) -> Result<(), MemoryError> {
        self.write(ptr, &value.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounds_are_checked_without_overflow() {
        let mut bytes = vec![0u8; 16];
        let mut m = GuestMemory::new(&mut bytes);
        assert_eq!(m.read(0, 0).unwrap(), &[] as &[u8]);
        assert_eq!(m.read(16, 0).unwrap(), &[] as &[u8]);
        assert!(m.read(17, 0).is_err());
        assert!(m.read(12, 5).is_err());
        assert!(m.read(u32::MAX, 2).is_err());
        assert!(m.read(1, u32::MAX).is_err());
        m.write_u32(12, 0xdead_beef).unwrap();
        assert_eq!(m.read_u32(12).unwrap(), 0xdead_beef);
        assert!(m.write_u64(12, 1).is_err());
        assert_eq!(
            Status::from(m.write_u32(13, 1).unwrap_err()),
            Status::InvalidMemoryAccess
        );
    }

    proptest! {
        #[test]
        fn any_range_is_in_bounds_or_an_error(size in 0usize..64, ptr: u32, len: u32) {
            let mut bytes = vec![0u8; size];
            let m = GuestMemory::new(&mut bytes);
            let inside = u64::from(ptr) + u64::from(len) <= size as u64;
            prop_assert_eq!(m.read(ptr, len).is_ok(), inside);
        }
    }
}
