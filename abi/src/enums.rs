//! Every enum of the ABI with its exact numeric value (ABI.md §2).

/// Declares a `#[repr(u32)]` enum with exact wire values, `as_u32`, `as_i32` and a checked
/// `from_u32` that rejects unknown values instead of guessing.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:expr),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name { $($(#[$vmeta])* #[doc = concat!("`", stringify!($variant), "` = ", stringify!($value))] $variant = $value),+ }

        impl $name {
            /// Every value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value on the wire.
            pub const fn as_u32(self) -> u32 { self as u32 }

            /// The value as the `i32` a wasm function takes or returns.
            pub const fn as_i32(self) -> i32 { self as u32 as i32 }

            /// The enum for a wire value, or `None` for a value the ABI does not define.
            pub const fn from_u32(value: u32) -> Option<Self> {
                match value { $(v if v == $value => Some($name::$variant),)+ _ => None }
            }

            /// The name of the variant.
            pub const fn name(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

wire_enum! {
    /// `proxy_status_t` / `WasmResult`: the result of every hostcall.
    Status {
        Ok = 0,
        NotFound = 1,
        BadArgument = 2,
        SerializationFailure = 3,
        ParseFailure = 4,
        BadExpression = 5,
        InvalidMemoryAccess = 6,
        Empty = 7,
        CasMismatch = 8,
        ResultMismatch = 9,
        InternalFailure = 10,
        BrokenConnection = 11,
        Unimplemented = 12,
    }
}

wire_enum! {
    /// `proxy_log_level_t`.
    LogLevel { Trace = 0, Debug = 1, Info = 2, Warn = 3, Error = 4, Critical = 5 }
}

wire_enum! {
    /// `proxy_buffer_type_t`.
    BufferType {
        HttpRequestBody = 0,
        HttpResponseBody = 1,
        DownstreamData = 2,
        UpstreamData = 3,
        HttpCallResponseBody = 4,
        GrpcReceiveBuffer = 5,
        VmConfiguration = 6,
        PluginConfiguration = 7,
        CallData = 8,
    }
}

wire_enum! {
    /// `proxy_map_type_t`.
    MapType {
        HttpRequestHeaders = 0,
        HttpRequestTrailers = 1,
        HttpResponseHeaders = 2,
        HttpResponseTrailers = 3,
        GrpcReceiveInitialMetadata = 4,
        GrpcReceiveTrailingMetadata = 5,
        HttpCallResponseHeaders = 6,
        HttpCallResponseTrailers = 7,
    }
}

wire_enum! {
    /// `proxy_stream_type_t` (ABI 0.2.0 and later).
    StreamType { HttpRequest = 0, HttpResponse = 1, Downstream = 2, Upstream = 3 }
}

wire_enum! {
    /// `proxy_peer_type_t`: who closed a connection.
    PeerType { Unknown = 0, Local = 1, Remote = 2 }
}

wire_enum! {
    /// `proxy_metric_type_t`.
    MetricType { Counter = 0, Gauge = 1, Histogram = 2 }
}

wire_enum! {
    /// `proxy_action_t`: what the Rust and Go SDKs return from every filter callback.
    Action { Continue = 0, Pause = 1 }
}

wire_enum! {
    /// `FilterHeadersStatus` (C++ SDK) returned by the header callbacks.
    FilterHeadersStatus {
        Continue = 0,
        StopIteration = 1,
        ContinueAndEndStream = 2,
        StopAllIterationAndBuffer = 3,
        StopAllIterationAndWatermark = 4,
    }
}

wire_enum! {
    /// `FilterDataStatus` (C++ SDK) returned by the body callbacks.
    FilterDataStatus {
        Continue = 0,
        StopIterationAndBuffer = 1,
        StopIterationAndWatermark = 2,
        StopIterationNoBuffer = 3,
    }
}

wire_enum! {
    /// `FilterTrailersStatus` (C++ SDK) returned by the trailer callbacks.
    FilterTrailersStatus { Continue = 0, StopIteration = 1 }
}

wire_enum! {
    /// `FilterStatus` (C++ SDK) returned by the L4 callbacks.
    FilterStatus { Continue = 0, StopIteration = 1 }
}

wire_enum! {
    /// gRPC status codes, as passed to `proxy_send_local_response` and `proxy_on_grpc_close`.
    /// SDKs pass `-1` (`0xFFFF_FFFF`) for "not a gRPC response", which `from_u32` rejects.
    GrpcStatus {
        Ok = 0,
        Canceled = 1,
        Unknown = 2,
        InvalidArgument = 3,
        DeadlineExceeded = 4,
        NotFound = 5,
        AlreadyExists = 6,
        PermissionDenied = 7,
        ResourceExhausted = 8,
        FailedPrecondition = 9,
        Aborted = 10,
        OutOfRange = 11,
        Unimplemented = 12,
        Internal = 13,
        Unavailable = 14,
        DataLoss = 15,
        Unauthenticated = 16,
    }
}

wire_enum! {
    /// WASI preview1 errno values that a proxy-wasm host returns (ABI.md §2.12).
    WasiErrno {
        Success = 0,
        Badf = 8,
        Exist = 20,
        Fault = 21,
        Inval = 28,
        Noent = 44,
        Nosys = 52,
        Notdir = 54,
        Notsup = 58,
        Notcapable = 76,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_unknown_values_are_rejected() {
        for s in Status::ALL {
            assert_eq!(Status::from_u32(s.as_u32()), Some(*s));
        }
        assert_eq!(Status::InvalidMemoryAccess.as_i32(), 6);
        assert_eq!(Status::Unimplemented.as_i32(), 12);
        assert_eq!(Status::from_u32(13), None);
        assert_eq!(BufferType::from_u32(9), None);
        assert_eq!(MapType::from_u32(8), None);
        assert_eq!(LogLevel::from_u32(6), None);
        assert_eq!(GrpcStatus::from_u32(u32::MAX), None);
        assert_eq!(StreamType::Upstream.as_u32(), 3);
    }
}
