//! vmmpp's typed errors as one Rust error: the status of the C call that failed (which vmmpp
//! error type it came from), its message (vmmpp's, with the numbers that explain it) and, for a
//! pool refused by a quota, those numbers typed.

use std::ffi::{CStr, CString};
use std::fmt;
use std::os::raw::c_char;

use crate::ffi;

/// The status of a failed call: vmmpp_kv_status without VMMPP_KV_OK, one variant per vmmpp error
/// type (vmmpp/error.hpp).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// vmmpp::invalid_argument, or an unknown name (VMMPP_KV_INVALID_ARGUMENT).
    InvalidArgument,
    /// vmmpp::out_of_memory, std::bad_alloc (VMMPP_KV_OUT_OF_MEMORY).
    OutOfMemory,
    /// vmmpp::over_quota: a model's limit or the global one refused (VMMPP_KV_OVER_QUOTA).
    OverQuota,
    /// vmmpp::out_of_blocks (VMMPP_KV_OUT_OF_BLOCKS).
    OutOfBlocks,
    /// vmmpp::cuda_error: a driver call failed (VMMPP_KV_CUDA_ERROR).
    CudaError,
    /// vmmpp::cuda_unavailable: no driver or no device (VMMPP_KV_CUDA_UNAVAILABLE).
    CudaUnavailable,
    /// Anything else (VMMPP_KV_ERROR).
    Other,
    /// vmmpp::out_of_sequence_slots (VMMPP_KV_OUT_OF_SEQUENCE_SLOTS).
    OutOfSequenceSlots,
    /// vmmpp::tier_full: a host tier had no room (VMMPP_KV_TIER_FULL).
    TierFull,
}

impl Status {
    /// The status of a C code; None for VMMPP_KV_OK. Codes this crate does not know (a newer
    /// library) are Other: still an error.
    pub fn from_code(code: i32) -> Option<Status> {
        Some(match code {
            0 => return None,
            1 => Status::InvalidArgument,
            2 => Status::OutOfMemory,
            3 => Status::OverQuota,
            4 => Status::OutOfBlocks,
            5 => Status::CudaError,
            6 => Status::CudaUnavailable,
            8 => Status::OutOfSequenceSlots,
            9 => Status::TierFull,
            _ => Status::Other,
        })
    }

    /// The C code (vmmpp_kv_status).
    pub fn code(self) -> i32 {
        match self {
            Status::InvalidArgument => 1,
            Status::OutOfMemory => 2,
            Status::OverQuota => 3,
            Status::OutOfBlocks => 4,
            Status::CudaError => 5,
            Status::CudaUnavailable => 6,
            Status::Other => 7,
            Status::OutOfSequenceSlots => 8,
            Status::TierFull => 9,
        }
    }
}

/// The numbers of a quota's refusal (vmmpp::over_quota).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverQuota {
    /// The limit that refused: "model <name>" or "global".
    pub which: String,
    /// Bytes the refused commit needed.
    pub requested: u64,
    /// Bytes in use under that limit then.
    pub in_use: u64,
    /// That limit.
    pub limit: u64,
}

/// A failed call: its status, vmmpp's message, and for a pool's over-quota refusal its numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    status: Status,
    message: String,
    over_quota: Option<OverQuota>,
}

/// The candle-cuda-vmm name of the error type.
pub type VmmError = Error;

/// `Result<T, vmmpp::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error made on the Rust side (a model this crate does not know, say), typed as vmmpp
    /// would type it.
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
            over_quota: None,
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }
    /// vmmpp's message (the C ABI's last error of the failed call).
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The refusal's numbers, for an over-quota error of a pool (the KV cache's C calls give the
    /// message only: its numbers are in the text).
    pub fn over_quota(&self) -> Option<&OverQuota> {
        self.over_quota.as_ref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.message, self.status)
    }
}

impl std::error::Error for Error {}

fn c_text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the C ABI returns NUL-terminated strings valid until the thread's next failing call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Ok, or the error of a vmmpp_kv_* call that returned `code`. Call on the thread that made the
/// call, before any other (the last error is per thread).
pub(crate) fn check_kv(code: ffi::vmmpp_kv_status) -> Result<()> {
    match Status::from_code(code) {
        None => Ok(()),
        // SAFETY: no arguments; the string is copied at once.
        Some(status) => Err(Error::new(status, c_text(unsafe { ffi::vmmpp_kv_last_error() }))),
    }
}

/// As check_kv, for the vmmpp_pool_* and vmmpp_budget_* calls (their own last error), with the
/// over-quota numbers.
pub(crate) fn check_pool(code: ffi::vmmpp_kv_status) -> Result<()> {
    let Some(status) = Status::from_code(code) else {
        return Ok(());
    };
    // SAFETY: no arguments; the string is copied at once.
    let mut error = Error::new(status, c_text(unsafe { ffi::vmmpp_pool_last_error() }));
    if status == Status::OverQuota {
        let (mut requested, mut in_use, mut limit) = (0u64, 0u64, 0u64);
        let mut which = [0 as c_char; 256];
        // SAFETY: every pointer is to a live local; `which` holds which.len() bytes.
        let set = unsafe {
            ffi::vmmpp_pool_last_over_quota(
                &mut requested,
                &mut in_use,
                &mut limit,
                which.as_mut_ptr(),
                which.len() as u64,
            )
        };
        if set != 0 {
            error.over_quota = Some(OverQuota {
                which: c_text(which.as_ptr()),
                requested,
                in_use,
                limit,
            });
        }
    }
    Err(error)
}

/// `s` as a C string; an interior NUL is an InvalidArgument naming `what`.
pub(crate) fn c_string(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::new(Status::InvalidArgument, format!("{what} {s:?} contains a NUL byte")))
}

/// A static comma-separated list of the C ABI, as names.
pub(crate) fn name_list(p: *const c_char) -> Vec<String> {
    c_text(p)
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip_and_unknown_codes_stay_errors() {
        assert_eq!(Status::from_code(0), None);
        for code in 1..=9 {
            assert_eq!(Status::from_code(code).map(Status::code), Some(code));
        }
        assert_eq!(Status::from_code(42), Some(Status::Other));
        assert_eq!(check_pool(0), Ok(()));
    }

    #[test]
    fn display_gives_the_message_and_the_status() {
        let e = Error::new(Status::OutOfBlocks, "out of KV blocks: 5 needed, 4 free of 4");
        assert_eq!(e.to_string(), "out of KV blocks: 5 needed, 4 free of 4 (OutOfBlocks)");
        assert!(e.over_quota().is_none());
    }
}
