//! VRAM registered by pointer through the C API (`PDX_MEM_VRAM`, `pdx_cuda::DeviceBuffer::from_raw`): two agents of
//! this process move device memory the test allocated itself over the `cuda` transport, every byte checked. Without
//! CUDA the GPU test prints "skipped: no CUDA device" and the registration is `PDX_ERR_UNSUPPORTED`.

mod common;

use std::ptr;

use common::*;
use pdx::pdx_status::*;
use pdx::*;
use pdx_cuda::{Device, DeviceBuffer, Stream};

fn cuda_device() -> Option<Device> {
    match Device::new(0) {
        Ok(d) => Some(d),
        Err(e) if e.is_unavailable() => {
            println!("skipped: no CUDA device ({e})");
            None
        }
        Err(e) => panic!("CUDA present but device 0 failed: {e}"),
    }
}

fn register_vram(a: &Agent, addr: u64, len: u64, dev: u32) -> (pdx_status, *mut pdx_mem) {
    let mut mem = ptr::null_mut();
    // SAFETY: live agent, writable output; the device memory outlives the registration (the callers hold it).
    let s = unsafe {
        pdx_register_mem(
            a.0,
            addr,
            len,
            pdx_mem_kind::PDX_MEM_VRAM as i32,
            dev,
            &mut mem,
        )
    };
    (s, mem)
}

fn vram_list(ranges: &[(u64, u64)]) -> Dlist {
    let mut d = ptr::null_mut();
    // SAFETY: writable output; then a live list used by this thread only.
    unsafe {
        expect(
            pdx_dlist_create(pdx_mem_kind::PDX_MEM_VRAM as i32, &mut d),
            PDX_OK,
            "",
        );
        for &(addr, len) in ranges {
            expect(pdx_dlist_add(d, addr, len, 0), PDX_OK, "");
        }
    }
    Dlist(d)
}

#[test]
fn without_cuda_vram_is_unsupported() {
    if pdx_cuda::driver().is_ok() {
        println!("CUDA present: VRAM registration is tested by vram_by_pointer_in_process");
        return;
    }
    let a = Agent::new("no-gpu");
    let (s, mem) = register_vram(&a, 0x7f00_0000_0000, 4096, 0);
    expect(s, PDX_ERR_UNSUPPORTED, "CUDA unavailable");
    assert!(mem.is_null());
    println!("skipped: no CUDA device (checked that VRAM registration is PDX_ERR_UNSUPPORTED)");
}

#[test]
fn vram_by_pointer_in_process() {
    let Some(dev) = cuda_device() else { return };
    const LEN: usize = 1 << 20;
    // The engine's device memory, allocated outside pdx; a 256 KiB sub-range of the source is what is registered.
    let src = DeviceBuffer::new(&dev, LEN).expect("alloc src");
    let dst = DeviceBuffer::new(&dev, LEN).expect("alloc dst");
    let stream = Stream::new(&dev).expect("stream");
    let data: Vec<u8> = (0..LEN)
        .map(|i| (i as u8).wrapping_mul(13) ^ (i >> 9) as u8)
        .collect();
    stream.upload(&src, 0, &data).expect("upload");
    stream.memset(&dst, 0, LEN, 0).expect("memset");
    stream.synchronize().expect("sync");

    let target = Agent::new("vram-target");
    let init = Agent::new("vram-init");
    let off = 256 << 10;
    let (s, tm) = register_vram(&target, src.addr() + off as u64, (LEN / 2) as u64, 0);
    expect(s, PDX_OK, "");
    let _tm = Mem(tm);
    let (s, im) = register_vram(&init, dst.addr(), LEN as u64, 0);
    expect(s, PDX_OK, "");
    let _im = Mem(im);
    // Not device memory, or past its allocation: invalid.
    let host = HostBuf::new(4096);
    expect(
        register_vram(&init, host.addr(), 4096, 0).0,
        PDX_ERR_INVALID,
        "not device memory",
    );
    expect(
        register_vram(&init, dst.addr() + 4096, LEN as u64, 0).0,
        PDX_ERR_INVALID,
        "allocation",
    );

    init.load(&target);
    // READ 4 blocks of 64 KiB of the registered sub-range into the start of dst.
    let blk = 64u64 << 10;
    let base = src.addr() + off as u64;
    let local = vram_list(
        &(0..4)
            .map(|i| (dst.addr() + i * blk, blk))
            .collect::<Vec<_>>(),
    );
    let remote = vram_list(&(0..4).map(|i| (base + i * blk, blk)).collect::<Vec<_>>());
    let (s, x) = Xfer::create(
        &init,
        pdx_xfer_op::PDX_XFER_READ,
        &local,
        "vram-target",
        &remote,
        Some(b"vram"),
    );
    expect(s, PDX_OK, "");
    let x = x.unwrap();
    assert_eq!(x.transport(), "cuda");
    x.run();
    let mut out = vec![0u8; LEN];
    stream.download(&dst, 0, &mut out).expect("download");
    stream.synchronize().expect("sync");
    let n = (4 * blk) as usize;
    assert_eq!(&out[..n], &data[off..off + n], "READ moved every byte");
    assert!(out[n..].iter().all(|b| *b == 0), "nothing else written");
    assert_eq!(
        target.notifs(10_000_000),
        vec![("vram-init".to_string(), b"vram".to_vec())]
    );
    drop(x);
}
