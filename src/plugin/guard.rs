//! The filesystem gate in front of WASI's `open-at`: a mount serves regular
//! files and directories only. Opening a FIFO blocks a host thread until a
//! writer appears (forever, if none does), and a device such as `/dev/zero`
//! streams without end; neither can be stopped by the call's deadline once
//! the host thread is inside the system call. So the kind of the target is
//! looked up first (`stat-at` never blocks) and anything else is refused
//! with `access`, and a warning in the instance's log naming the file.
//! WASI cannot create such files, so only a host process could swap one in
//! between the look-up and the open.

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::filesystem::WasiFilesystemView;
use wasmtime_wasi::p2::FsError;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    Descriptor, DescriptorFlags, DescriptorType, ErrorCode, HostDescriptor, OpenFlags, PathFlags,
};

use super::sandbox::State;

/// The WASI filesystem interface as wasmtime-wasi defines it in the linker
/// (guests importing an older 0.2.x resolve to it by semver).
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";
const OPEN_AT: &str = "[method]descriptor.open-at";

/// Replaces `open-at` in `linker` (which must already hold WASI p2) with the
/// checked version.
pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(FILESYSTEM_TYPES)?;
    types.func_wrap_async(
        OPEN_AT,
        |mut store,
         (fd, path_flags, path, oflags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let state = store.data_mut();
                let entry = state.entry.clone();
                let recent = state.recent.clone();
                let mut fs = state.filesystem();
                let borrowed = Resource::new_borrow(fd.rep());
                match fs.stat_at(borrowed, path_flags, path.clone()).await {
                    Ok(stat) if !servable(stat.type_) => {
                        let message = format!(
                            "refused to open `{path}`: it is a {}; mounts serve regular files and directories only",
                            kind_name(stat.type_)
                        );
                        tracing::warn!(target: "cdp::plugin", plugin = &*entry, "{message}");
                        recent.push("warn", message);
                        return Ok((Err(ErrorCode::Access),));
                    }
                    // A missing file may be created; other errors are the
                    // open's to report.
                    Ok(_) | Err(_) => {}
                }
                let r = fs.open_at(fd, path_flags, path, oflags, flags).await;
                Ok((error_code(r)?,))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Splits a filesystem result into the guest's error code or a trap, as the
/// generated bindings do.
fn error_code<T>(r: Result<T, FsError>) -> wasmtime::Result<Result<T, ErrorCode>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => e.downcast().map(Err),
    }
}

fn servable(t: DescriptorType) -> bool {
    matches!(t, DescriptorType::RegularFile | DescriptorType::Directory | DescriptorType::SymbolicLink)
}

fn kind_name(t: DescriptorType) -> &'static str {
    match t {
        DescriptorType::Fifo => "FIFO (named pipe)",
        DescriptorType::CharacterDevice => "character device",
        DescriptorType::BlockDevice => "block device",
        DescriptorType::Socket => "socket",
        _ => "FIFO, socket or other special file",
    }
}
