//! Linear memory that costs only the pages the guest wrote.
//!
//! wasmi 2.0 keeps a module's own memory in a heap buffer and writes zeros to all of it, so
//! every page of the initial memory is resident from the start (a Rust guest: 17 pages,
//! 1.1 MiB) and, once freed, usually stays with the allocator. A memory the host creates may
//! instead live in a buffer the host owns. So the module is rewritten at compile time to
//! import its one memory (same type, same index: imported memories come first), and each
//! instance gets a fresh anonymous mapping: wasmi zero-fills its initial size, those pages
//! (still all zero) go straight back to the kernel, and only then are the module's data
//! segments written. Dropping the instance unmaps everything.
//!
//! Making those pages resident (wasmi's fill) is most of what a new instance costs, so with
//! [`crate::EngineConfig::pooling`] dropped instances' mappings are kept in a [`MappingPool`]
//! with their pages resident instead, as wasmtime's pool keeps its slots: creation then fills
//! pages that are already there.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// The import a rewritten module's memory comes from (not a name a guest could use: the
/// module name has a character no SDK emits).
pub(super) const MODULE: &str = "filterbox:wasmi";
/// The field of [`MODULE`] the memory is imported as.
pub(super) const NAME: &str = "memory";

const MAGIC_AND_VERSION: &[u8] = b"\0asm\x01\0\0\0";
const IMPORT_SECTION: u8 = 2;
const MEMORY_SECTION: u8 = 5;
const MEMORY_IMPORT: u8 = 2;

/// `wasm` with its one defined memory turned into an import of [`MODULE`].[`NAME`] with the
/// same limits. `None` when there is nothing to rewrite (no defined memory, several, or bytes
/// that do not parse as sections): the module is then used as it is.
pub(super) fn import_own_memory(wasm: &[u8]) -> Option<Vec<u8>> {
    let mut rest = wasm.strip_prefix(MAGIC_AND_VERSION)?;
    let mut sections = Vec::new();
    while let Some((&id, after_id)) = rest.split_first() {
        let (size, len) = read_u32(after_id)?;
        let end = len.checked_add(usize::try_from(size).ok()?)?;
        sections.push((id, after_id.get(len..end)?));
        rest = after_id.get(end..)?;
    }
    let mut memories = sections.iter().filter(|(id, _)| *id == MEMORY_SECTION);
    let (_, memory_section) = memories.next()?;
    if memories.next().is_some() {
        return None;
    }
    let (count, len) = read_u32(memory_section)?;
    let limits = memory_section
        .get(len..)
        .filter(|l| count == 1 && !l.is_empty())?;
    let mut entry = Vec::new();
    for name in [MODULE, NAME] {
        write_u32(&mut entry, u32::try_from(name.len()).ok()?);
        entry.extend_from_slice(name.as_bytes());
    }
    entry.push(MEMORY_IMPORT);
    entry.extend_from_slice(limits);

    let mut imports = sections.iter().filter(|(id, _)| *id == IMPORT_SECTION);
    let import_section = match (imports.next(), imports.next()) {
        (Some((_, content)), None) => {
            let (count, len) = read_u32(content)?;
            let mut section = Vec::new();
            write_u32(&mut section, count.checked_add(1)?);
            section.extend_from_slice(content.get(len..)?);
            section.extend_from_slice(&entry);
            section
        }
        (None, _) => {
            let mut section = vec![1];
            section.extend_from_slice(&entry);
            section
        }
        (Some(_), Some(_)) => return None,
    };

    let mut out = Vec::with_capacity(wasm.len() + entry.len() + 8);
    out.extend_from_slice(MAGIC_AND_VERSION);
    let mut imports_written = false;
    for (id, content) in sections {
        // The import section follows the type section (1); custom sections (0) go anywhere.
        let content = match id {
            IMPORT_SECTION => &import_section[..],
            MEMORY_SECTION => continue,
            _ => content,
        };
        if !imports_written && (id == IMPORT_SECTION || !matches!(id, 0 | 1)) {
            imports_written = true;
            if id != IMPORT_SECTION {
                write_section(&mut out, IMPORT_SECTION, &import_section)?;
            }
        }
        write_section(&mut out, id, content)?;
    }
    Some(out)
}

fn write_section(out: &mut Vec<u8>, id: u8, content: &[u8]) -> Option<()> {
    out.push(id);
    write_u32(out, u32::try_from(content.len()).ok()?);
    out.extend_from_slice(content);
    Some(())
}

/// An unsigned LEB128 `u32` and the bytes it took.
fn read_u32(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut value: u32 = 0;
    for (i, &byte) in bytes.iter().take(5).enumerate() {
        let bits = u32::from(byte & 0x7f);
        let shift = 7 * i as u32;
        // The fifth byte may only carry the top four bits.
        if shift == 28 && bits > 0x0f {
            return None;
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn write_u32(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A private anonymous mapping that one instance's linear memory lives in. Reserved at the
/// memory's ceiling (no swap reserved), so growing never moves it; untouched pages cost
/// nothing.
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing in it is tied to a thread.
unsafe impl Send for Mapping {}

impl Mapping {
    /// A mapping of `len` bytes, or `None` when the kernel refuses it.
    pub(super) fn new(len: usize) -> Option<Mapping> {
        if len == 0 {
            return None;
        }
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases no
        // Rust memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(Mapping {
            ptr: NonNull::new(ptr.cast())?,
            len,
        })
    }

    /// The whole mapping, to hand to wasmi as a memory's buffer.
    ///
    /// # Safety
    ///
    /// The slice must not be used after this mapping is dropped: whoever holds it (the
    /// store the memory is created in) must be dropped first.
    pub(super) unsafe fn buffer(&mut self) -> &'static mut [u8] {
        // SAFETY: `ptr..ptr + len` is mapped readable and writable for as long as `self`
        // lives (the caller keeps the slice no longer), and `&mut self` makes this the only
        // slice into it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Makes the first `len` bytes resident in one system call, so that wasmi's zero fill
    /// does not fault on every page of them (much the slower way to the same pages). Where
    /// the kernel cannot (before Linux 5.14), the fill faults them in.
    pub(super) fn populate(&self, len: usize) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        // SAFETY: the range is inside this mapping (clamped), and populating writes nothing a
        // reader could see: the pages were zero and stay zero.
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast(),
                len.min(self.len),
                libc::MADV_POPULATE_WRITE,
            );
        }
    }

    /// Hands the pages from `offset` (rounded up to a wasm page) to the end back to the
    /// kernel; they read as zeros afterwards.
    ///
    /// # Safety
    ///
    /// Nothing may refer to those bytes.
    unsafe fn discard_from(&self, offset: usize) {
        let offset = offset.next_multiple_of(crate::WASM_PAGE);
        let Some(len) = self.len.checked_sub(offset).filter(|&len| len > 0) else {
            return;
        };
        // SAFETY: `offset..len` is inside this mapping and page aligned; the caller
        // guarantees nothing refers to it.
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(offset).cast(),
                len,
                libc::MADV_DONTNEED,
            );
        }
    }

    /// Hands the pages of `bytes`, a prefix of this mapping that holds only zeros, back to
    /// the kernel: they read as zeros again and are resident again only once written.
    pub(super) fn release_zeroed(&self, bytes: &mut [u8]) {
        if bytes.as_ptr() != self.ptr.as_ptr().cast_const() || bytes.len() > self.len {
            return;
        }
        // SAFETY: the range is inside this private anonymous mapping (checked above) and is
        // borrowed mutably here, so nothing reads it meanwhile; the kernel replaces its pages
        // with zero-filled ones, which is what the bytes already hold. A failure leaves the
        // pages as they are, so the result does not matter.
        unsafe {
            libc::madvise(bytes.as_mut_ptr().cast(), bytes.len(), libc::MADV_DONTNEED);
        }
    }
}

/// Mappings of dropped instances, for the next ones (see the module doc).
pub(super) struct MappingPool {
    idle: Mutex<Vec<Mapping>>,
    /// How many idle mappings are kept at most.
    max_idle: usize,
    /// Every pooled mapping's size: the pool's largest linear memory.
    mapping_len: usize,
    /// How much of an idle mapping stays resident; the rest goes back to the kernel.
    keep_resident: usize,
}

impl MappingPool {
    pub(super) fn new(config: &crate::PoolingConfig) -> MappingPool {
        MappingPool {
            idle: Mutex::new(Vec::new()),
            max_idle: usize::try_from(config.max_instances).unwrap_or(usize::MAX),
            mapping_len: config.max_memory_bytes,
            keep_resident: config.keep_resident_bytes,
        }
    }

    /// The size of every pooled mapping: the largest memory a pooled instance may grow to
    /// (beyond it wasmi would trap rather than refuse the growth, so the instance's limit is
    /// this at most).
    pub(super) fn mapping_len(&self) -> usize {
        self.mapping_len
    }

    /// An idle mapping, or a new one; `None` when the kernel refuses one.
    fn take(&self) -> Option<Mapping> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        idle.or_else(|| Mapping::new(self.mapping_len))
    }

    fn give_back(&self, mapping: Mapping) {
        // SAFETY: the instance that used the mapping is gone (see `InstanceMemory`), so
        // nothing refers to its bytes; whatever the next instance sees of them is
        // zero-filled by wasmi first (at creation, or as the memory grows).
        unsafe { mapping.discard_from(self.keep_resident) };
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(mapping);
        }
    }
}

/// Where an instance's memory lives: its own mapping, or one lent by the engine's pool. Kept
/// in the instance after its store (dropped after it), so that the store's memory never
/// outlives the mapping.
pub(super) struct InstanceMemory {
    mapping: Option<Mapping>,
    pool: Option<Arc<MappingPool>>,
}

impl InstanceMemory {
    /// A mapping for a memory of `ty` under a limit of `limit_pages`: from `pool` when there
    /// is one (its pages may be resident), else a new one reserved at the smaller of the
    /// type's maximum and the limit.
    pub(super) fn new(
        ty: wasmi::MemoryType,
        limit_pages: u32,
        pool: Option<&Arc<MappingPool>>,
    ) -> Option<InstanceMemory> {
        if let Some(pool) = pool {
            return Some(InstanceMemory {
                mapping: Some(pool.take()?),
                pool: Some(pool.clone()),
            });
        }
        let pages = ty.maximum().map_or(u64::from(limit_pages), |max| {
            max.min(u64::from(limit_pages))
        });
        let bytes = pages.checked_mul(crate::WASM_PAGE as u64)?;
        Some(InstanceMemory {
            mapping: Some(Mapping::new(usize::try_from(bytes).ok()?)?),
            pool: None,
        })
    }

    pub(super) fn mapping(&mut self) -> Option<&mut Mapping> {
        self.mapping.as_mut()
    }
}

impl Drop for InstanceMemory {
    fn drop(&mut self) {
        if let (Some(pool), Some(mapping)) = (&self.pool, self.mapping.take()) {
            pool.give_back(mapping);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Mapping::new` with this length, and the slice
        // `buffer` handed out is gone by now (its contract).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_defined_memory_becomes_an_import_with_the_same_limits() {
        let wasm = wat::parse_str(
            r#"(module
                (import "env" "f" (func))
                (memory (export "memory") 2 5)
                (data (i32.const 70000) "hi"))"#,
        )
        .unwrap();
        let rewritten = import_own_memory(&wasm).unwrap();
        let expected = wat::parse_str(
            r#"(module
                (import "env" "f" (func))
                (import "filterbox:wasmi" "memory" (memory 2 5))
                (export "memory" (memory 0))
                (data (i32.const 70000) "hi"))"#,
        )
        .unwrap();
        assert_eq!(rewritten, expected);
    }

    #[test]
    fn a_module_without_imports_gets_an_import_section_after_its_types() {
        let wasm = wat::parse_str(
            r#"(module (type (func)) (memory 1) (func (type 0)) (export "memory" (memory 0)))"#,
        )
        .unwrap();
        let rewritten = import_own_memory(&wasm).unwrap();
        let expected = wat::parse_str(
            r#"(module (type (func)) (import "filterbox:wasmi" "memory" (memory 1))
                (func (type 0)) (export "memory" (memory 0)))"#,
        )
        .unwrap();
        assert_eq!(rewritten, expected);
    }

    #[test]
    fn modules_without_exactly_one_defined_memory_are_left_alone() {
        let none = wat::parse_str("(module (func))").unwrap();
        assert_eq!(import_own_memory(&none), None);
        let imported = wat::parse_str(r#"(module (import "env" "m" (memory 1)))"#).unwrap();
        assert_eq!(import_own_memory(&imported), None);
        assert_eq!(import_own_memory(b"\0asm\x01\0\0\0\x05\x09"), None);
        assert_eq!(import_own_memory(b"not wasm"), None);
    }

    #[test]
    fn leb128_round_trips_and_rejects_overlong_values() {
        for value in [0, 1, 127, 128, 16_384, u32::MAX] {
            let mut out = Vec::new();
            write_u32(&mut out, value);
            assert_eq!(read_u32(&out), Some((value, out.len())));
        }
        assert_eq!(read_u32(&[0xff, 0xff, 0xff, 0xff, 0x1f]), None);
        assert_eq!(read_u32(&[0x80, 0x80]), None);
    }

    #[test]
    fn released_pages_read_as_zero_and_stay_writable() {
        let mut mapping = Mapping::new(4 * 65536).unwrap();
        // SAFETY: the slice is dropped at the end of this test, before the mapping.
        let buffer = unsafe { mapping.buffer() };
        buffer[..65536].fill(0);
        mapping.release_zeroed(&mut buffer[..65536]);
        assert!(buffer[..65536].iter().all(|&b| b == 0));
        buffer[100] = 7;
        assert_eq!(buffer[100], 7);
    }

    proptest! {
        #[test]
        fn rewriting_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut wasm = MAGIC_AND_VERSION.to_vec();
            wasm.extend_from_slice(&body);
            let _ = import_own_memory(&wasm);
        }
    }
}
