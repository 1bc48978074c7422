use super::*;
use proptest::prelude::*;

fn layout(nb: u32, bs: u32, h: u32, d: u32, e: u32, l: BlockLayout) -> KvLayout {
    KvLayout::new(nb, bs, h, d, e, l).unwrap()
}

/// Tensors whose every byte encodes (tensor, position), so a misplaced row is always visible.
fn tensors(spec: &PackSpec, seed: u8) -> Vec<Vec<u8>> {
    (0..spec.num_tensors())
        .map(|t| {
            (0..spec.tensor().tensor_bytes())
                .map(|i| (i.wrapping_mul(131) ^ (t as u64 * 29) ^ seed as u64) as u8)
                .collect()
        })
        .collect()
}

#[test]
fn offsets_follow_the_documented_shapes() {
    // NHD [2, 4, 3, 8] of fp16: block 16*... row = 16 bytes.
    let l = layout(2, 4, 3, 8, 2, BlockLayout::Nhd);
    assert_eq!(l.row_bytes(), 16);
    assert_eq!(l.block_bytes(), 4 * 3 * 16);
    assert_eq!(l.offset(1, 2, 1), 192 + (2 * 3 + 1) * 16);
    let l = layout(2, 4, 3, 8, 2, BlockLayout::Hnd);
    assert_eq!(l.offset(1, 2, 1), 192 + (4 + 2) * 16);
    assert_eq!(l.tensor_bytes(), 384);
}

#[test]
fn layouts_reject_zero_sizes_and_overflow() {
    assert!(matches!(
        KvLayout::new(0, 16, 8, 128, 2, BlockLayout::Nhd),
        Err(LayoutError::Invalid(_))
    ));
    assert!(matches!(
        KvLayout::new(1, 16, 8, 128, 3, BlockLayout::Nhd),
        Err(LayoutError::Invalid(_))
    ));
    assert!(matches!(
        KvLayout::new(u32::MAX, u32::MAX, u32::MAX, 128, 8, BlockLayout::Nhd),
        Err(LayoutError::Overflow(_))
    ));
    let l = layout(4, 16, 8, 128, 2, BlockLayout::Nhd);
    assert!(PackSpec::new(l, 0, 0, 8, BlockLayout::Nhd).is_err());
    assert!(PackSpec::new(l, 2, 4, 4, BlockLayout::Nhd).is_err());
    assert!(PackSpec::new(l, 2, 4, 9, BlockLayout::Nhd).is_err());
    assert!(PackSpec::new(l, 2, 4, 8, BlockLayout::Nhd).is_ok());
    assert_eq!("HND".parse::<BlockLayout>().unwrap(), BlockLayout::Hnd);
    assert!("nchw".parse::<BlockLayout>().is_err());
}

#[test]
fn tables_are_validated() {
    assert_eq!(
        validate_table(&[0, 3, 4], 4, false),
        Err(LayoutError::BlockOutOfRange {
            index: 2,
            block: 4,
            num_blocks: 4
        })
    );
    assert!(validate_table(&[1, 1], 4, false).is_ok());
    assert_eq!(
        validate_table(&[2, 0, 2], 4, true),
        Err(LayoutError::DuplicateBlock {
            first: 0,
            second: 2,
            block: 2
        })
    );
    assert!(validate_table(&[], 4, true).is_ok());
    assert!(validate_table(&[u32::MAX], u32::MAX, true).is_err());
}

#[test]
fn short_buffers_and_bad_tables_are_errors_not_panics() {
    let l = layout(4, 2, 2, 4, 2, BlockLayout::Nhd);
    let spec = PackSpec::full(l, 2).unwrap();
    let ts = tensors(&spec, 1);
    let refs: Vec<&[u8]> = ts.iter().map(|t| t.as_slice()).collect();
    let mut staging = vec![0u8; spec.staging_bytes(2).unwrap() as usize - 1];
    assert!(matches!(
        pack_ref(&spec, &refs, &[0, 1], &mut staging),
        Err(LayoutError::BufferTooSmall { .. })
    ));
    let mut staging = vec![0u8; 1 << 12];
    assert!(matches!(
        pack_ref(&spec, &refs, &[9], &mut staging),
        Err(LayoutError::BlockOutOfRange { .. })
    ));
    assert!(matches!(
        pack_ref(&spec, &refs[..1], &[0], &mut staging),
        Err(LayoutError::Invalid(_))
    ));
    let short = vec![0u8; 3];
    assert!(matches!(
        pack_ref(&spec, &[&short, &short], &[0], &mut staging),
        Err(LayoutError::BufferTooSmall { .. })
    ));
}

#[test]
fn pack_places_each_row_where_the_docs_say() {
    // 3 blocks, 2 tokens, 4 heads, 1 element of 1 byte: every element is one byte, easy to spell out.
    let l = layout(3, 2, 4, 1, 1, BlockLayout::Nhd);
    // tensor byte = block*8 + token*4 + head
    let t: Vec<u8> = (0..24).collect();
    // Heads [1, 3) of block 2 then block 0, staged HND: [head][token].
    let spec = PackSpec::new(l, 1, 1, 3, BlockLayout::Hnd).unwrap();
    let mut staging = vec![0xEE; 8];
    pack_ref(&spec, &[&t], &[2, 0], &mut staging).unwrap();
    assert_eq!(staging, vec![17, 21, 18, 22, 1, 5, 2, 6]);
    // And back into a zeroed tensor: only those heads of those blocks come back.
    let mut back = vec![0u8; 24];
    unpack_ref(&spec, &staging, &[2, 0], &mut [&mut back]).unwrap();
    let mut want = vec![0u8; 24];
    for i in [1, 2, 5, 6, 17, 18, 21, 22] {
        want[i] = i as u8;
    }
    assert_eq!(back, want);
}

#[test]
fn nhd_to_hnd_through_staging_is_a_transpose() {
    let nhd = layout(2, 3, 2, 2, 2, BlockLayout::Nhd);
    let hnd = layout(2, 3, 2, 2, 2, BlockLayout::Hnd);
    let src_spec = PackSpec::new(nhd, 1, 0, 2, BlockLayout::Hnd).unwrap();
    let dst_spec = PackSpec::new(hnd, 1, 0, 2, BlockLayout::Hnd).unwrap();
    let src: Vec<u8> = (0..nhd.tensor_bytes() as u8).collect();
    let mut staging = vec![0u8; src_spec.staging_bytes(2).unwrap() as usize];
    pack_ref(&src_spec, &[&src], &[0, 1], &mut staging).unwrap();
    let mut dst = vec![0u8; hnd.tensor_bytes() as usize];
    unpack_ref(&dst_spec, &staging, &[0, 1], &mut [&mut dst]).unwrap();
    for b in 0..2 {
        for tok in 0..3 {
            for h in 0..2 {
                let (s, d) = (
                    nhd.offset(b, tok, h) as usize,
                    hnd.offset(b, tok, h) as usize,
                );
                assert_eq!(
                    src[s..s + 4],
                    dst[d..d + 4],
                    "block {b} token {tok} head {h}"
                );
            }
        }
    }
}

#[test]
fn heterogeneous_tp_halves_recompose_the_full_cache() {
    // Prefill TP1 with 8 heads; decode TP2 ranks each read 4 heads, then a TP1 reader recomposes from them.
    let full = layout(6, 4, 8, 4, 2, BlockLayout::Nhd);
    let half = layout(6, 4, 4, 4, 2, BlockLayout::Hnd);
    let table = [5, 1, 3];
    let src = tensors(&PackSpec::full(full, 2).unwrap(), 7);
    let src_refs: Vec<&[u8]> = src.iter().map(|t| t.as_slice()).collect();
    let mut rebuilt = vec![vec![0u8; full.tensor_bytes() as usize]; 2];
    for rank in 0..2 {
        let pack = PackSpec::new(full, 2, 4 * rank, 4 * rank + 4, BlockLayout::Nhd).unwrap();
        let mut staging = vec![0u8; pack.staging_bytes(3).unwrap() as usize];
        pack_ref(&pack, &src_refs, &table, &mut staging).unwrap();
        let into_half = PackSpec::new(half, 2, 0, 4, BlockLayout::Nhd).unwrap();
        let mut ranks = vec![vec![0u8; half.tensor_bytes() as usize]; 2];
        let mut r: Vec<&mut [u8]> = ranks.iter_mut().map(|t| t.as_mut_slice()).collect();
        unpack_ref(&into_half, &staging, &table, &mut r).unwrap();
        // The rank's cache, repacked over its 4 heads, scattered into its half of a full cache.
        let mut staging2 = vec![0u8; into_half.staging_bytes(3).unwrap() as usize];
        let r: Vec<&[u8]> = ranks.iter().map(|t| t.as_slice()).collect();
        pack_ref(&into_half, &r, &table, &mut staging2).unwrap();
        let back = PackSpec::new(full, 2, 4 * rank, 4 * rank + 4, BlockLayout::Nhd).unwrap();
        let mut out: Vec<&mut [u8]> = rebuilt.iter_mut().map(|t| t.as_mut_slice()).collect();
        unpack_ref(&back, &staging2, &table, &mut out).unwrap();
    }
    for t in 0..2 {
        for &b in &table {
            let off = (b as u64 * full.block_bytes()) as usize;
            let n = full.block_bytes() as usize;
            assert_eq!(
                rebuilt[t][off..off + n],
                src[t][off..off + n],
                "tensor {t} block {b}"
            );
        }
        // Blocks outside the table stay untouched.
        let off = (2 * full.block_bytes()) as usize;
        assert!(rebuilt[t][off..off + full.block_bytes() as usize]
            .iter()
            .all(|&x| x == 0));
    }
}

#[test]
fn plan_picks_vector_width_and_runs() {
    let l = layout(64, 16, 8, 128, 2, BlockLayout::Nhd);
    let full = PackSpec::full(l, 4).unwrap();
    let a = full.plan(10, 0x1000 | 0x2000).unwrap();
    assert_eq!(
        (a.unit, a.run_rows, a.units_per_block, a.run_units),
        (16, 128, 2048, 2048)
    );
    assert_eq!((a.pairs, a.chunks), (40, 2));
    // A base address aligned to 2 bytes only forces 2-byte units.
    assert_eq!(full.plan(10, 0x1002).unwrap().unit, 2);
    let sliced = PackSpec::new(l, 4, 2, 6, BlockLayout::Nhd).unwrap();
    assert_eq!(sliced.run_rows(), 4);
    let transposed = PackSpec::new(l, 4, 0, 8, BlockLayout::Hnd).unwrap();
    assert_eq!(transposed.run_rows(), 1);
    let h = layout(64, 16, 8, 128, 2, BlockLayout::Hnd);
    assert_eq!(
        PackSpec::new(h, 1, 3, 5, BlockLayout::Hnd)
            .unwrap()
            .run_rows(),
        32
    );
    // head_dim 3 of fp16: 6-byte rows; a whole 2-token block (12 bytes) is one run and allows 4-byte units,
    // a head slice starts runs at multiples of 6 bytes and allows only 2.
    let odd = layout(4, 2, 2, 3, 2, BlockLayout::Nhd);
    assert_eq!(PackSpec::full(odd, 1).unwrap().plan(1, 0).unwrap().unit, 8);
    assert_eq!(
        PackSpec::new(odd, 1, 1, 2, BlockLayout::Nhd)
            .unwrap()
            .plan(1, 0)
            .unwrap()
            .unit,
        2
    );
    // Grid limits are errors.
    assert!(matches!(
        full.plan(usize::MAX / 2, 0),
        Err(LayoutError::Overflow(_))
    ));
}

fn arb_case() -> impl Strategy<Value = (PackSpec, Vec<u32>, u64, u8)> {
    (
        1u32..12,                                          // num_blocks
        1u32..9,                                           // block_size
        1u32..6,                                           // heads
        prop::sample::select(vec![1u32, 2, 3, 8, 16, 64]), // head_dim
        prop::sample::select(vec![1u32, 2, 4, 8]),         // elem_bytes
        any::<bool>(),
        any::<bool>(),
        1u32..4, // tensors
        any::<u8>(),
    )
        .prop_flat_map(|(nb, bs, h, d, e, thnd, shnd, nt, seed)| {
            let l = KvLayout::new(
                nb,
                bs,
                h,
                d,
                e,
                if thnd {
                    BlockLayout::Hnd
                } else {
                    BlockLayout::Nhd
                },
            )
            .unwrap();
            let staging = if shnd {
                BlockLayout::Hnd
            } else {
                BlockLayout::Nhd
            };
            (
                (0..h).prop_flat_map(move |s| (Just(s), s + 1..=h)),
                Just((l, staging, nt, seed)),
                // A scatter needs distinct blocks: a shuffled prefix of 0..nb.
                Just((0..nb).collect::<Vec<u32>>()).prop_shuffle(),
                0..=nb as usize,
                prop::sample::select(vec![0u64, 1, 2, 4, 8, 16, 0x100]),
            )
        })
        .prop_map(|((s, e), (l, staging, nt, seed), ids, n, align)| {
            let spec = PackSpec::new(l, nt, s, e, staging).unwrap();
            (spec, ids[..n].to_vec(), align, seed)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The kernel's index arithmetic (emulated thread by thread) equals the reference on random layouts,
    /// head ranges, orders, alignments and tables; every staging byte is checked (poisoned before).
    #[test]
    fn emulated_kernel_matches_reference((spec, table, align, seed) in arb_case()) {
        let mut ts = tensors(&spec, seed);
        let n = spec.staging_bytes(table.len()).unwrap() as usize;
        let mut want = vec![0xA5u8; n];
        let refs: Vec<&[u8]> = ts.iter().map(|t| t.as_slice()).collect();
        pack_ref(&spec, &refs, &table, &mut want).unwrap();
        let args = spec.plan(table.len(), align).unwrap();
        prop_assert_eq!(args.unit & (args.unit - 1), 0);
        prop_assert_eq!(align % args.unit, 0);
        let mut got = vec![0x5Au8; n];
        let mut mrefs: Vec<&mut [u8]> = ts.iter_mut().map(|t| t.as_mut_slice()).collect();
        emulate_kernel(&spec, &args, true, &mut mrefs, &table, &mut got).unwrap();
        prop_assert_eq!(&got, &want);

        // Scatter into poisoned tensors: listed blocks' sliced heads equal the originals, all else poison.
        let orig = tensors(&spec, seed);
        let mut ref_out = vec![vec![0xC3u8; spec.tensor().tensor_bytes() as usize]; spec.num_tensors() as usize];
        let mut emu_out = ref_out.clone();
        let mut r: Vec<&mut [u8]> = ref_out.iter_mut().map(|t| t.as_mut_slice()).collect();
        unpack_ref(&spec, &want, &table, &mut r).unwrap();
        let mut e: Vec<&mut [u8]> = emu_out.iter_mut().map(|t| t.as_mut_slice()).collect();
        emulate_kernel(&spec, &args, false, &mut e, &table, &mut got).unwrap();
        prop_assert_eq!(&emu_out, &ref_out);
        let l = spec.tensor();
        for (t, out) in ref_out.iter().enumerate() {
            for b in 0..l.num_blocks() {
                for tok in 0..l.block_size() {
                    for h in 0..l.heads() {
                        let o = l.offset(b, tok, h) as usize;
                        let row = &out[o..o + l.row_bytes() as usize];
                        if table.contains(&b) && spec.heads().contains(&h) {
                            prop_assert_eq!(row, &orig[t][o..o + l.row_bytes() as usize]);
                        } else {
                            prop_assert!(row.iter().all(|&x| x == 0xC3));
                        }
                    }
                }
            }
        }
    }

    /// Random tables (out-of-range ids, duplicates) never panic: they are errors or succeed.
    #[test]
    fn arbitrary_tables_never_panic(table in prop::collection::vec(any::<u32>(), 0..20), nb in 1u32..30) {
        let l = KvLayout::new(nb, 2, 2, 2, 1, BlockLayout::Nhd).unwrap();
        let spec = PackSpec::full(l, 1).unwrap();
        let t = vec![0u8; l.tensor_bytes() as usize];
        let mut staging = vec![0u8; spec.staging_bytes(table.len()).unwrap() as usize];
        let ok = table.iter().all(|&b| b < nb);
        prop_assert_eq!(pack_ref(&spec, &[&t], &table, &mut staging).is_ok(), ok);
        let mut t2 = t.clone();
        let distinct = { let mut s = table.clone(); s.sort(); s.dedup(); s.len() == table.len() };
        prop_assert_eq!(unpack_ref(&spec, &staging, &table, &mut [&mut t2]).is_ok(), ok && distinct);
    }
}
