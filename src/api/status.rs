//! The single place where errors become `tonic::Status`.
