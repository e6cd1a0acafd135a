//! Page cache semantics (QEMU's page_cache.c and save_xbzrle_page).

use qmig_xbzrle::{decode, InsertRefused, PageCache, SaveOutcome, XbzrleError};

const P: usize = 4096;

fn page(fill: u8) -> Vec<u8> {
    vec![fill; P]
}

#[test]
fn geometry_checks() {
    assert_eq!(PageCache::new(0, 0).unwrap_err(), XbzrleError::ZeroPageSize);
    assert_eq!(
        PageCache::new(100, P).unwrap_err(),
        XbzrleError::CacheSmallerThanPage {
            cache_size: 100,
            page_size: P
        }
    );
    assert_eq!(
        PageCache::new(3 * P as u64, P).unwrap_err(),
        XbzrleError::SlotsNotPowerOfTwo { slots: 3 }
    );
    // Rounded down first, as in QEMU: 4.5 pages -> 4 slots.
    assert_eq!(
        PageCache::new(4 * P as u64 + P as u64 / 2, P)
            .unwrap()
            .slots(),
        4
    );
    assert_eq!(PageCache::new(P as u64, P).unwrap().slots(), 1);
    let c = PageCache::new(64 << 20, P).unwrap();
    assert_eq!(
        (c.slots(), c.page_size(), c.len(), c.is_empty()),
        (16384, P, 0, true)
    );
}

#[test]
fn direct_mapped_slots() {
    let c = PageCache::new(4 * P as u64, P).unwrap();
    assert_eq!(c.slot_of(0), 0);
    assert_eq!(c.slot_of(P as u64 + 17), 1);
    assert_eq!(c.slot_of(5 * P as u64), 1);
    assert_eq!(c.slot_of(7 * P as u64), 3);
}

#[test]
fn insert_lookup_and_age() {
    let mut c = PageCache::new(4 * P as u64, P).unwrap();
    let a = P as u64;
    let b = 5 * P as u64; // same slot as `a`
    assert!(!c.lookup(a, 1));
    assert!(c.insert(a, &page(1), 1).is_ok());
    assert_eq!(c.len(), 1);
    assert_eq!(c.get(a), Some(&page(1)[..]));
    assert_eq!(c.get(b), None);
    // Another address in the slot is refused while age + 2 > generation.
    assert_eq!(c.insert(b, &page(2), 1).unwrap_err(), InsertRefused);
    assert_eq!(c.insert(b, &page(2), 2).unwrap_err(), InsertRefused);
    assert_eq!(
        c.get(a),
        Some(&page(1)[..]),
        "refusal leaves the entry alone"
    );
    // A hit refreshes the age: still refused at generation 3.
    assert!(c.lookup(a, 2));
    assert_eq!(c.age(a), Some(2));
    assert!(c.insert(b, &page(2), 3).is_err());
    // Same address is always replaced.
    assert!(c.insert(a, &page(3), 3).is_ok());
    assert_eq!((c.get(a), c.age(a)), (Some(&page(3)[..]), Some(3)));
    // Old enough: replaced.
    assert!(c.insert(b, &page(4), 5).is_ok());
    assert_eq!(c.get(a), None);
    assert_eq!(c.get(b), Some(&page(4)[..]));
    assert!(!c.lookup(a, 5));
    assert_eq!(c.len(), 1);
    // get_mut updates in place.
    c.get_mut(b).unwrap()[0] = 9;
    assert_eq!(c.get(b).unwrap()[0], 9);
    // Zero page refreshes the entry.
    c.insert_zero(b, 6).unwrap();
    assert_eq!((c.get(b), c.age(b)), (Some(&page(0)[..]), Some(6)));
    assert_eq!(c.insert_zero(a, 6), Err(InsertRefused));
    c.clear();
    assert!(c.is_empty());
}

#[test]
fn resize_keeps_what_fits() {
    let mut c = PageCache::new(4 * P as u64, P).unwrap();
    for (i, addr) in [0u64, 1, 2, 3].iter().enumerate() {
        c.insert(addr * P as u64, &page(i as u8), 10 + i as u64)
            .unwrap();
    }
    assert_eq!(
        c.resize(3 * P as u64).unwrap_err(),
        XbzrleError::SlotsNotPowerOfTwo { slots: 3 }
    );
    assert_eq!(c.slots(), 4, "unchanged on error");
    // Shrink to 2 slots: pages 0/2 and 1/3 collide; the younger (greater age) stays.
    c.resize(2 * P as u64).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c.get(0), None);
    assert_eq!(c.get(2 * P as u64), Some(&page(2)[..]));
    assert_eq!(c.get(3 * P as u64), Some(&page(3)[..]));
    assert_eq!(c.age(3 * P as u64), Some(13));
    // Grow: everything kept, in its new slot.
    c.resize(8 * P as u64).unwrap();
    assert_eq!((c.slots(), c.len()), (8, 2));
    assert_eq!(c.get(2 * P as u64), Some(&page(2)[..]));
    c.insert(10 * P as u64, &page(7), 20).unwrap(); // slot 2, entry aged 12: replaced
    assert_eq!(c.get(2 * P as u64), None);
}

#[test]
fn save_page_follows_qemu() {
    let mut c = PageCache::new(4 * P as u64, P).unwrap();
    let mut out = vec![0u8; P];
    let addr = 2 * P as u64;
    let mut v1 = page(0);
    v1[10] = 1;
    // Miss: inserted, page sent in full.
    assert_eq!(
        c.save_page(addr, &v1, 1, false, &mut out),
        SaveOutcome::Miss { inserted: true }
    );
    assert_eq!(
        c.save_page(addr, &v1, 2, false, &mut out),
        SaveOutcome::Unchanged
    );
    // Small change: encoded against the cache, cache updated.
    let mut v2 = v1.clone();
    v2[100] = 5;
    let SaveOutcome::Encoded(n) = c.save_page(addr, &v2, 3, false, &mut out) else {
        panic!()
    };
    let mut dst = v1.clone();
    decode(&out[..n], &mut dst).unwrap();
    assert_eq!(dst, v2);
    assert_eq!(c.get(addr), Some(&v2[..]));
    // Overflow: cache takes the new page.
    let v3: Vec<u8> = (0..P).map(|i| (i * 31 + 7) as u8).collect();
    assert_eq!(
        c.save_page(addr, &v3, 4, false, &mut out),
        SaveOutcome::Overflow
    );
    assert_eq!(c.get(addr), Some(&v3[..]));
    // Last stage: encode but leave the cache alone.
    let mut v4 = v3.clone();
    v4[0] ^= 1;
    let SaveOutcome::Encoded(_) = c.save_page(addr, &v4, 5, true, &mut out) else {
        panic!()
    };
    assert_eq!(c.get(addr), Some(&v3[..]));
    // Miss in the last stage: not inserted.
    assert_eq!(
        c.save_page(6 * P as u64, &v1, 5, true, &mut out),
        SaveOutcome::Miss { inserted: false }
    );
    // Miss with a fresh other page in the slot: refused.
    assert_eq!(
        c.save_page(6 * P as u64, &v1, 6, false, &mut out),
        SaveOutcome::Miss { inserted: false }
    );
    assert_eq!(
        c.save_page(6 * P as u64, &v1, 8, false, &mut out),
        SaveOutcome::Miss { inserted: true }
    );
}
