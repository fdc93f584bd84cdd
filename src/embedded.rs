//! STUB — being implemented by a helper.
#![allow(missing_docs)]
