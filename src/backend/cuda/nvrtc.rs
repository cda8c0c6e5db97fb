//! NVRTC loaded by hand: the seven entry points we use exist unchanged from CUDA 11 to 13,
//! while cudarc's binding of one version wants all of that version's symbols (NVRTC 13 dropped
//! `nvrtcGetNVVM`, which the 12.x binding lists).

use anyhow::{bail, Result};
use cudarc::nvrtc::Ptx;
use std::ffi::{c_char, c_void, CString};
type Prog = *mut c_void;
type Create = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    i32,
    *const *const c_char,
    *const *const c_char,
) -> i32;
type Compile = unsafe extern "C" fn(Prog, i32, *const *const c_char) -> i32;
type Size = unsafe extern "C" fn(Prog, *mut usize) -> i32;
type Get = unsafe extern "C" fn(Prog, *mut c_char) -> i32;
type Destroy = unsafe extern "C" fn(*mut Prog) -> i32;

struct Lib {
    _lib: libloading::Library,
    create: Create,
    compile: Compile,
    log_size: Size,
    log: Get,
    ptx_size: Size,
    ptx: Get,
    destroy: Destroy,
}

fn load() -> Result<&'static Lib> {
    static LIB: std::sync::OnceLock<std::result::Result<Lib, String>> = std::sync::OnceLock::new();
    let r = LIB.get_or_init(|| {
        let names = [
            "libnvrtc.so",
            "libnvrtc.so.13",
            "libnvrtc.so.12",
            "libnvrtc.so.11.2",
        ];
        let mut errs = Vec::new();
        for n in names {
            let lib = match unsafe { libloading::Library::new(n) } {
                Ok(l) => l,
                Err(e) => {
                    errs.push(format!("{n}: {e}"));
                    continue;
                }
            };
            let syms = unsafe {
                (|| -> std::result::Result<_, libloading::Error> {
                    Ok((
                        *lib.get::<Create>(b"nvrtcCreateProgram\0")?,
                        *lib.get::<Compile>(b"nvrtcCompileProgram\0")?,
                        *lib.get::<Size>(b"nvrtcGetProgramLogSize\0")?,
                        *lib.get::<Get>(b"nvrtcGetProgramLog\0")?,
                        *lib.get::<Size>(b"nvrtcGetPTXSize\0")?,
                        *lib.get::<Get>(b"nvrtcGetPTX\0")?,
                        *lib.get::<Destroy>(b"nvrtcDestroyProgram\0")?,
                    ))
                })()
            };
            match syms {
                Ok((create, compile, log_size, log, ptx_size, ptx, destroy)) => {
                    return Ok(Lib {
                        _lib: lib,
                        create,
                        compile,
                        log_size,
                        log,
                        ptx_size,
                        ptx,
                        destroy,
                    })
                }
                Err(e) => errs.push(format!("{n}: {e}")),
            }
        }
        Err(errs.join("; "))
    });
    match r {
        Ok(l) => Ok(l),
        Err(e) => bail!("NVRTC (libnvrtc) not found: {e}"),
    }
}

fn check(what: &str, st: i32) -> Result<()> {
    if st != 0 {
        bail!("NVRTC {what}: status {st}");
    }
    Ok(())
}

/// PTX of `src` compiled with `flags`; a compile error carries NVRTC's log.
pub fn compile(src: &str, flags: &[String], name: &str) -> Result<Ptx> {
    let lib = load()?;
    let csrc = CString::new(src)?;
    let cname = CString::new(format!("{name}.cu"))?;
    let cflags: Vec<CString> = flags
        .iter()
        .map(|f| CString::new(f.as_str()))
        .collect::<std::result::Result<_, _>>()?;
    let ptrs: Vec<*const c_char> = cflags.iter().map(|c| c.as_ptr()).collect();
    let mut prog: Prog = std::ptr::null_mut();
    unsafe {
        check(
            "create",
            (lib.create)(
                &mut prog,
                csrc.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            ),
        )?;
        let st = (lib.compile)(prog, ptrs.len() as i32, ptrs.as_ptr());
        if st != 0 {
            let mut n = 0usize;
            (lib.log_size)(prog, &mut n);
            let mut buf = vec![0u8; n.max(1)];
            (lib.log)(prog, buf.as_mut_ptr() as *mut c_char);
            (lib.destroy)(&mut prog);
            let log = String::from_utf8_lossy(&buf)
                .trim_end_matches('\0')
                .to_string();
            bail!("kernels/{name}.cu does not compile (status {st}): {log}");
        }
        let mut n = 0usize;
        check("ptx size", (lib.ptx_size)(prog, &mut n))?;
        let mut buf = vec![0u8; n.max(1)];
        check("ptx", (lib.ptx)(prog, buf.as_mut_ptr() as *mut c_char))?;
        (lib.destroy)(&mut prog);
        let text = String::from_utf8_lossy(&buf)
            .trim_end_matches('\0')
            .to_string();
        Ok(Ptx::from_src(text))
    }
}
