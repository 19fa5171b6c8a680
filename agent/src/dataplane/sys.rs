//! The few bpf(2) commands aya 0.14 does not expose: atomic lookup-and-delete of a hash
//! map element (garbage collection), byte-level element access (copying a map whose
//! layout is unchanged into a resized one), loading a trivial tc program (preflight), and
//! pinning any object from a borrowed fd (aya pins a link only by consuming its handle,
//! which closes the fd if the pin fails: see `repin`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

pub const BPF_ANY: u64 = 0;
pub const BPF_NOEXIST: u64 = 1;

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// `union bpf_attr` for the map element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of union bpf_attr whose pointers (if any) point
    // to buffers the caller keeps alive for the call; the kernel reads at most size bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn elem(fd: BorrowedFd<'_>, key: *const u8, value: *mut u8, flags: u64) -> ElemAttr {
    ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags,
    }
}

fn not_found(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

/// Removes `key` and returns the value it had at that instant, atomically with respect to
/// the programs' updates of the element (`None`: there was no such element).
pub fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let mut attr = elem(fd, (key as *const K).cast(), value.as_mut_ptr().cast(), 0);
    match sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        // SAFETY: the kernel wrote a whole V (V is plain data).
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Raw element access for maps known only by their sizes.
pub struct RawMap<'a> {
    pub fd: BorrowedFd<'a>,
    pub key_size: usize,
    /// Bytes of one lookup result (for per-CPU maps: every CPU's value, 8-byte aligned).
    pub value_size: usize,
}

impl RawMap<'_> {
    /// Every key, in the kernel's iteration order.
    pub fn keys(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut next = vec![0u8; self.key_size];
        loop {
            let prev = out.last().map(|k| k.as_ptr()).unwrap_or(std::ptr::null());
            let mut attr = elem(self.fd, prev, next.as_mut_ptr(), 0);
            match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => out.push(next.clone()),
                Err(e) if not_found(&e) => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_size];
        let mut attr = elem(self.fd, key.as_ptr(), value.as_mut_ptr(), 0);
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn set(&self, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
        let mut attr = elem(self.fd, key.as_ptr(), value.as_ptr().cast_mut(), flags);
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `prog_ifindex`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
}

/// Loads (and at once unloads) `r0 = 0; exit` as a tc program: what the dataplane needs
/// from bpf(2), with the privileges the caller has.
pub fn probe_tc_program() -> io::Result<()> {
    // BPF_MOV64_IMM(BPF_REG_0, 0), BPF_EXIT_INSN()
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel returned a new program fd that we own.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

/// `union bpf_attr` for BPF_OBJ_PIN and BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `path` as a C string (`InvalidInput` if it holds a NUL byte).
pub fn c_path(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Pins the object behind `fd` (map, program or link) at `path` on bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Opens the object pinned at `path`.
pub fn obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The kernel id of the map, program or link behind `fd` (each info struct starts with
/// `type` then `id`; the kernel fills only the `info_len` bytes asked for).
pub fn obj_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u32; 2];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[1])
}
