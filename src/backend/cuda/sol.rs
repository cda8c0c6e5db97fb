//! The six cuSOLVER entry points we use, loaded by hand: they exist unchanged in cuSOLVER 11,
//! 12 and 13, while cudarc's binding of one version wants all of that version's symbols.

use anyhow::{bail, Result};
use std::ffi::c_void;
pub type Handle = *mut c_void;
pub const LOWER: i32 = 0; // CUBLAS_FILL_MODE_LOWER
type Create = unsafe extern "C" fn(*mut Handle) -> i32;
type Destroy = unsafe extern "C" fn(Handle) -> i32;
type SetStream = unsafe extern "C" fn(Handle, *mut c_void) -> i32;
type BufSize = unsafe extern "C" fn(Handle, i32, i32, *mut f64, i32, *mut i32) -> i32;
type Factor = unsafe extern "C" fn(Handle, i32, i32, *mut f64, i32, *mut f64, i32, *mut i32) -> i32;
pub struct Lib {
    _lib: libloading::Library,
    pub create: Create,
    pub destroy: Destroy,
    pub set_stream: SetStream,
    pub potrf_buffer: BufSize,
    pub potrf: Factor,
    pub potri_buffer: BufSize,
    pub potri: Factor,
}
impl Lib {
    pub fn load() -> Result<Lib> {
        let names = [
            "libcusolver.so",
            "libcusolver.so.13",
            "libcusolver.so.12",
            "libcusolver.so.11",
        ];
        let mut errs = Vec::new();
        for n in names {
            match unsafe { libloading::Library::new(n) } {
                Ok(lib) => unsafe {
                    let create = *lib.get::<Create>(b"cusolverDnCreate\0")?;
                    let destroy = *lib.get::<Destroy>(b"cusolverDnDestroy\0")?;
                    let set_stream = *lib.get::<SetStream>(b"cusolverDnSetStream\0")?;
                    let potrf_buffer = *lib.get::<BufSize>(b"cusolverDnDpotrf_bufferSize\0")?;
                    let potrf = *lib.get::<Factor>(b"cusolverDnDpotrf\0")?;
                    let potri_buffer = *lib.get::<BufSize>(b"cusolverDnDpotri_bufferSize\0")?;
                    let potri = *lib.get::<Factor>(b"cusolverDnDpotri\0")?;
                    return Ok(Lib {
                        _lib: lib,
                        create,
                        destroy,
                        set_stream,
                        potrf_buffer,
                        potrf,
                        potri_buffer,
                        potri,
                    });
                },
                Err(e) => errs.push(format!("{n}: {e}")),
            }
        }
        bail!("cuSOLVER (libcusolver) not found: {}", errs.join("; "))
    }
}

pub(super) fn check_sol(what: &str, s: i32) -> Result<()> {
    if s != 0 {
        bail!("cuSOLVER {what}: status {s}");
    }
    Ok(())
}
