//! GPU memory in the transfer engine: registration of device and pinned memory, the `cuda` transport in one
//! process and across two processes through CUDA IPC handles carried in the metadata, and the refusal of host
//! transports for device memory, and device memory of the caller registered by pointer (sub-ranges of one CUDA
//! allocation, reached by a peer process through the allocation's IPC handle and offsets). Without CUDA each GPU test prints `skipped: no CUDA driver (libcuda) found`;
//! `without_cuda_gpu_memory_is_unavailable` checks that case.

use std::time::Duration;

use pdx_transfer::metadata::{AgentMetadata, METADATA_VERSION_CUDA, METADATA_VERSION_CUDA_OFFSET};
use pdx_transfer::*;

fn cuda() -> bool {
    match pdx_cuda::Device::new(0) {
        Ok(_) => true,
        Err(e) if e.is_unavailable() => {
            println!("{} ({e})", pdx_cuda::SKIP_NO_CUDA);
            false
        }
        Err(e) => panic!("CUDA present but device 0 failed: {e}"),
    }
}

fn list(m: &RegisteredMemory, ranges: &[(usize, usize)]) -> XferDescList {
    XferDescList {
        kind: m.kind(),
        descs: ranges
            .iter()
            .map(|&(off, len)| m.desc(off, len).expect("desc"))
            .collect(),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn without_cuda_gpu_memory_is_unavailable() {
    let agent = Agent::new(AgentConfig::new("no-gpu")).expect("agent");
    if pdx_cuda::driver().is_ok() {
        println!("CUDA present: allocation is tested by the GPU tests");
        return;
    }
    for kind in [MemoryKind::Device(0), MemoryKind::PinnedHost] {
        match agent.allocate_kind(kind, 4096) {
            Err(TransferError::Cuda(e)) => assert!(e.is_unavailable(), "{e}"),
            other => panic!("{kind:?}: expected CUDA unavailable, got {other:?}"),
        }
    }
    // Host memory and its metadata are unaffected (version 1, or 2 with UCX; no CUDA extension).
    let _host = agent.allocate(4096).expect("host");
    let md = agent.local_metadata().expect("metadata");
    assert_ne!(u16::from_le_bytes([md[4], md[5]]), METADATA_VERSION_CUDA);
    assert_eq!(AgentMetadata::decode_ext(&md).expect("decode").1.cuda, None);
    println!("{}", pdx_cuda::SKIP_NO_CUDA);
}

#[test]
fn device_and_pinned_memory_in_one_process() {
    if !cuda() {
        return;
    }
    let a = Agent::new(AgentConfig::new("gpu-a")).expect("agent");
    let b = Agent::new(AgentConfig::new("gpu-b")).expect("agent");
    let n = 4 << 20;
    let dev_a = a.allocate_kind(MemoryKind::Device(0), n).expect("device");
    let pin_a = a.allocate_kind(MemoryKind::PinnedHost, n).expect("pinned");
    let dev_b = b.allocate_kind(MemoryKind::Device(0), n).expect("device");
    let data = pattern(n, 5);
    dev_b.write(0, &data).expect("write device");
    a.load_remote(&b.local_metadata().expect("md"))
        .expect("load");

    // READ two scattered blocks of b's device memory into a's device memory, with a notification.
    let blocks = [(0usize, 64usize << 10), (1 << 20, 256 << 10)];
    let local = list(&dev_a, &[(4096, blocks[0].1), (2 << 20, blocks[1].1)]);
    let remote = list(&dev_b, &blocks);
    let req = a
        .create_xfer_from_descs(
            XferOp::Read,
            &local,
            "gpu-b",
            &remote,
            XferOptions {
                notif: Some(b"read done".to_vec()),
                ..Default::default()
            },
        )
        .expect("create");
    assert_eq!(req.transport(), TransportKind::Cuda);
    assert_eq!(req.post().expect("post"), XferStatus::Done);
    let mut got = vec![0u8; blocks[1].1];
    dev_a.read(2 << 20, &mut got).expect("read back");
    assert!(got == data[1 << 20..(1 << 20) + blocks[1].1]);
    assert_eq!(
        b.wait_notifications(Duration::from_secs(2))[0].payload,
        b"read done"
    );

    // WRITE from a's pinned memory into b's device memory.
    pin_a.write(0, &pattern(n, 9)).expect("pinned write");
    let req = a
        .create_xfer_from_descs(
            XferOp::Write,
            &list(&pin_a, &[(0, n)]),
            "gpu-b",
            &remote_all(&dev_b, n),
            XferOptions::default(),
        )
        .expect("create");
    assert_eq!(req.transport(), TransportKind::Cuda);
    req.post().expect("post");
    let mut got = vec![0u8; n];
    dev_b.read(0, &mut got).expect("read");
    assert!(got == pattern(n, 9));

    // Host transports never touch device memory.
    let forced = a.create_xfer_from_descs(
        XferOp::Read,
        &local,
        "gpu-b",
        &remote,
        XferOptions {
            transport: Some(TransportKind::Local),
            ..Default::default()
        },
    );
    assert!(
        matches!(forced, Err(TransferError::TransportUnavailable { .. })),
        "{:?}",
        forced.err()
    );
}

fn remote_all(m: &RegisteredMemory, n: usize) -> XferDescList {
    list(m, &[(0, n)])
}

/// The second process of `ipc_between_two_processes` (runs only when started by it): loads the parent's
/// metadata, READs its device region through CUDA IPC, checks it, WRITEs a new pattern back and notifies.
#[test]
fn ipc_child_process() {
    let Ok(hex) = std::env::var("PDX_GPU_PARENT_MD") else {
        return;
    };
    let md: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    let agent = Agent::new(AgentConfig::new("gpu-child")).expect("agent");
    let parent = agent.load_remote(&md).expect("load parent metadata");
    let decoded = AgentMetadata::decode(&md).expect("decode");
    let region = &decoded.regions[0];
    let n = region.len as usize;
    let mine = agent
        .allocate_kind(MemoryKind::Device(0), n)
        .expect("device");
    let remote = XferDescList {
        kind: region.kind,
        descs: vec![XferDesc {
            addr: region.addr,
            len: region.len,
            dev_id: 0,
        }],
    };
    let req = agent
        .create_xfer_from_descs(
            XferOp::Read,
            &list(&mine, &[(0, n)]),
            &parent,
            &remote,
            XferOptions::default(),
        )
        .expect("create read");
    assert_eq!(req.transport(), TransportKind::Cuda);
    req.post().expect("read");
    let mut got = vec![0u8; n];
    mine.read(0, &mut got).expect("read back");
    assert!(got == pattern(n, 21), "child read other bytes through IPC");
    mine.write(0, &pattern(n, 22)).expect("write");
    let req = agent
        .create_xfer_from_descs(
            XferOp::Write,
            &list(&mine, &[(0, n)]),
            &parent,
            &remote,
            XferOptions {
                notif: Some(b"child wrote".to_vec()),
                ..Default::default()
            },
        )
        .expect("create write");
    req.post().expect("write");
}

#[test]
fn ipc_between_two_processes() {
    if !cuda() {
        return;
    }
    let agent = Agent::new(AgentConfig::new("gpu-parent")).expect("agent");
    let n = 8 << 20;
    let dev = agent
        .allocate_kind(MemoryKind::Device(0), n)
        .expect("device");
    dev.write(0, &pattern(n, 21)).expect("write");
    let md = agent.local_metadata().expect("metadata");
    assert_eq!(u16::from_le_bytes([md[4], md[5]]), METADATA_VERSION_CUDA);
    let (_, ext) = AgentMetadata::decode_ext(&md).expect("decode");
    assert_eq!(ext.cuda.expect("cuda extension").ipc.len(), 1);
    let hex: String = md.iter().map(|b| format!("{b:02x}")).collect();
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "ipc_child_process", "--nocapture"])
        .env("PDX_GPU_PARENT_MD", hex)
        .status()
        .expect("spawn child");
    assert!(status.success(), "child failed");
    let notes = agent.wait_notifications(Duration::from_secs(5));
    assert!(
        notes.iter().any(|n| n.payload == b"child wrote"),
        "{notes:?}"
    );
    let mut got = vec![0u8; n];
    dev.read(0, &mut got).expect("read");
    assert!(
        got == pattern(n, 22),
        "the child's WRITE landed in our device memory"
    );
}

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The second process of `caller_device_memory_by_pointer_between_two_processes`: READs every device region of
/// the parent in place (region `i` holds `pattern(len, 50 + i)`), checks every byte, WRITEs `pattern(len, 60 + i)`
/// back, and notifies once.
#[test]
fn by_pointer_child_process() {
    let Ok(hex) = std::env::var("PDX_GPU_BY_POINTER_MD") else {
        return;
    };
    let md = from_hex(&hex);
    let agent = Agent::new(AgentConfig::new("by-pointer-child")).expect("agent");
    let parent = agent.load_remote(&md).expect("load parent metadata");
    let decoded = AgentMetadata::decode(&md).expect("decode");
    for (i, region) in decoded.regions.iter().enumerate() {
        let n = region.len as usize;
        let mine = agent
            .allocate_kind(MemoryKind::Device(0), n)
            .expect("device");
        let remote = XferDescList {
            kind: region.kind,
            descs: vec![XferDesc {
                addr: region.addr,
                len: region.len,
                dev_id: 0,
            }],
        };
        let read = agent
            .create_xfer_from_descs(
                XferOp::Read,
                &list(&mine, &[(0, n)]),
                &parent,
                &remote,
                XferOptions::default(),
            )
            .expect("create read");
        assert_eq!(read.transport(), TransportKind::Cuda);
        read.post().expect("read");
        let mut got = vec![0u8; n];
        mine.read(0, &mut got).expect("read back");
        assert!(
            got == pattern(n, 50 + i as u8),
            "region {i}: the child read other bytes (offset not honoured?)"
        );
        mine.write(0, &pattern(n, 60 + i as u8)).expect("write");
        let last = i + 1 == decoded.regions.len();
        let write = agent
            .create_xfer_from_descs(
                XferOp::Write,
                &list(&mine, &[(0, n)]),
                &parent,
                &remote,
                XferOptions {
                    notif: last.then(|| b"by pointer done".to_vec()),
                    ..Default::default()
                },
            )
            .expect("create write");
        write.post().expect("write");
    }
}

#[test]
fn caller_device_memory_by_pointer_between_two_processes() {
    if !cuda() {
        return;
    }
    let dev = pdx_cuda::Device::new(0).expect("device");
    // The engine's allocation (as a block of PyTorch's caching allocator), with two KV tensors inside it.
    let whole = 8 << 20;
    let engine = pdx_cuda::DeviceBuffer::new(&dev, whole).expect("alloc");
    let s = pdx_cuda::Stream::new(&dev).expect("stream");
    s.memset(&engine, 0, whole, 0x11).expect("memset");
    s.synchronize().expect("sync");
    let tensors = [(1usize << 20, 2usize << 20), (4 << 20, 1 << 20)];
    let agent = Agent::new(AgentConfig::new("by-pointer-parent")).expect("agent");
    let regs: Vec<RegisteredMemory> = tensors
        .iter()
        .enumerate()
        .map(|(i, &(off, n))| {
            // SAFETY: `engine` owns the allocation and outlives the agent and every registration (dropped at the
            // end of this test, after them: locals drop in reverse order).
            let buf = unsafe { pdx_cuda::DeviceBuffer::from_raw(engine.addr() + off as u64, n, 0) }
                .expect("from_raw");
            let r = agent.register_device(buf);
            r.write(0, &pattern(n, 50 + i as u8)).expect("write");
            r
        })
        .collect();
    let md = agent.local_metadata().expect("metadata");
    assert_eq!(
        u16::from_le_bytes([md[4], md[5]]),
        METADATA_VERSION_CUDA_OFFSET
    );
    let (_, ext) = AgentMetadata::decode_ext(&md).expect("decode");
    let offsets: Vec<u64> = ext
        .cuda
        .expect("cuda extension")
        .ipc
        .iter()
        .map(|(_, h)| h.offset())
        .collect();
    assert_eq!(offsets, vec![1 << 20, 4 << 20]);
    let hex: String = md.iter().map(|b| format!("{b:02x}")).collect();
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "by_pointer_child_process", "--nocapture"])
        .env("PDX_GPU_BY_POINTER_MD", hex)
        .status()
        .expect("spawn child");
    assert!(status.success(), "child failed");
    let notes = agent.wait_notifications(Duration::from_secs(5));
    assert!(
        notes.iter().any(|n| n.payload == b"by pointer done"),
        "{notes:?}"
    );
    // Every byte of the allocation: the tensors hold the child's WRITEs, the rest is untouched.
    let mut got = vec![0u8; whole];
    s.download(&engine, 0, &mut got).expect("download");
    let mut expect = vec![0x11u8; whole];
    for (i, &(off, n)) in tensors.iter().enumerate() {
        expect[off..off + n].copy_from_slice(&pattern(n, 60 + i as u8));
    }
    assert!(
        got == expect,
        "the child's WRITEs landed exactly in the registered sub-ranges"
    );
    drop(regs);
    drop(agent);
    // pdx never freed the engine's memory: it is still usable.
    s.memset(&engine, 0, whole, 0)
        .expect("memset after deregistration");
    s.synchronize().expect("sync");
}

#[test]
fn staged_over_tcp_between_device_and_host_memory() {
    if !cuda() {
        return;
    }
    // `tcp` forced: the path a peer on another host takes (device -> pinned staging -> tcp, and back).
    let a = Agent::new(AgentConfig::new("staged-a")).expect("agent");
    let b = Agent::new(AgentConfig::new("staged-b")).expect("agent");
    let n = 3 << 20;
    let dev = a.allocate_kind(MemoryKind::Device(0), n).expect("device");
    let host = b.allocate(n).expect("host");
    let dev_b = b
        .allocate_kind(MemoryKind::Device(0), 4096)
        .expect("device b");
    a.load_remote(&b.local_metadata().expect("md"))
        .expect("load");
    let tcp = || XferOptions {
        transport: Some(TransportKind::Tcp),
        notif: Some(b"staged".to_vec()),
    };
    dev.write(0, &pattern(n, 40)).expect("write");
    let blocks = [(0, 1 << 20), (2 << 20, 512 << 10)];
    let req = a
        .create_xfer_from_descs(
            XferOp::Write,
            &list(&dev, &blocks),
            "staged-b",
            &list(&host, &[(4096, 1 << 20), (1 << 21, 512 << 10)]),
            tcp(),
        )
        .expect("create write");
    assert_eq!(req.transport(), TransportKind::Tcp);
    assert_eq!(req.post().expect("post"), XferStatus::Done);
    let mut got = vec![0u8; 512 << 10];
    host.read(1 << 21, &mut got).expect("read");
    assert!(got == pattern(n, 40)[2 << 20..(2 << 20) + (512 << 10)]);
    assert!(b
        .wait_notifications(Duration::from_secs(2))
        .iter()
        .any(|x| x.payload == b"staged"));
    // READ back into other device offsets.
    host.write(0, &pattern(n, 41)).expect("host write");
    let req = a
        .create_xfer_from_descs(
            XferOp::Read,
            &list(&dev, &[(n - 8192, 8192)]),
            "staged-b",
            &list(&host, &[(100, 8192)]),
            tcp(),
        )
        .expect("create read");
    req.post().expect("post");
    let mut got = vec![0u8; 8192];
    dev.read(n - 8192, &mut got).expect("read");
    assert!(got == pattern(n, 41)[100..100 + 8192]);
    // The peer's device memory is not reachable over tcp (no peer-side staging).
    let r = a.create_xfer_from_descs(
        XferOp::Read,
        &list(&dev, &[(0, 4096)]),
        "staged-b",
        &list(&dev_b, &[(0, 4096)]),
        tcp(),
    );
    assert!(
        matches!(r, Err(TransferError::TransportUnavailable { .. })),
        "{:?}",
        r.err()
    );
}
