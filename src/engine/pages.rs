//! Base weights on transparent huge pages: vectors collected into memory that the kernel is
//! asked to back with 2 MiB pages before anything is written to it.
//!
//! Why: a decode pass streams the output head (hundreds of MB) from memory once per token. With
//! 4 KiB pages every 4 KiB of it costs a TLB miss and a page walk, and the hardware prefetchers
//! stop at each page boundary; measured on the 151,936 × 896 f32 head (two Xeon cores), an
//! 8-row pass took ~24.5 ms on 4 KiB pages and ~21.7 ms on huge pages (one row: ~20 ms either
//! way). Advising before the first write matters: the faults then allocate huge pages directly,
//! whereas collapsing pages already written (`MADV_COLLAPSE`) copied the head for 1.8 s.
//!
//! Best effort: where the kernel has no transparent huge pages (or says no), the vector is the
//! same, on small pages. Nothing here changes a value.

/// Huge page size on x86-64 and (with 4 KiB base pages) aarch64 Linux.
const HUGE: usize = 2 << 20;

/// Collects `len` items into a vector whose interior 2 MiB-aligned span was advised
/// `MADV_HUGEPAGE` before being written. Short vectors (under two huge pages) are collected
/// as usual.
pub fn collect_huge<T, I: IntoIterator<Item = T>>(len: usize, items: I) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    if bytes >= 2 * HUGE {
        advise(v.as_mut_ptr().cast::<u8>(), bytes);
    }
    v.extend(items);
    v
}

/// The whole huge pages inside `lo..lo + bytes` (addresses), if any.
fn huge_span(lo: usize, bytes: usize) -> Option<(usize, usize)> {
    let first = lo.checked_next_multiple_of(HUGE)?;
    let last = lo.checked_add(bytes)? / HUGE * HUGE;
    (last > first).then_some((first, last))
}

/// Advises the 2 MiB-aligned pages inside `start..start + bytes` for huge pages.
fn advise(start: *mut u8, bytes: usize) {
    let Some((first, last)) = huge_span(start as usize, bytes) else {
        return;
    };
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the range lies inside an allocation this process owns (the vector's capacity),
        // and MADV_HUGEPAGE only changes how its pages are backed, never their contents. Its
        // result is ignored on purpose: without THP the memory stays on small pages, which is
        // correct, only slower.
        let _ =
            unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_every_item_in_order() {
        for len in [0usize, 5, 3 << 20] {
            let v = collect_huge(len, (0..len).map(|i| i as u32));
            assert_eq!(v.len(), len);
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        }
    }

    /// The advised span is whole huge pages inside the range, or nothing.
    #[test]
    fn span_is_whole_pages_inside() {
        assert_eq!(huge_span(HUGE + 4096, HUGE), None);
        assert_eq!(huge_span(HUGE, HUGE), Some((HUGE, 2 * HUGE)));
        assert_eq!(huge_span(HUGE - 16, 3 * HUGE), Some((HUGE, 3 * HUGE)));
        assert_eq!(huge_span(4096, 3 * HUGE + 8192), Some((HUGE, 3 * HUGE)));
        assert_eq!(huge_span(usize::MAX - 10, 100), None);
    }
}
