//! agentmesh wire types: protobuf messages, tonic clients and servers, and the encoded file
//! descriptor set that server reflection serves. [`envoy`] holds the subset of Envoy's API
//! that the rate limiter serves (RLS v3), in Envoy's own packages.
#![allow(unreachable_pub, clippy::all, clippy::pedantic, missing_docs)]

/// Encoded `FileDescriptorSet` of every agentmesh proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("agentmesh_descriptor");

pub mod codec;

pub mod common {
    pub mod v1 {
        tonic::include_proto!("agentmesh.common.v1");
    }
}

pub mod ratelimit {
    pub mod v1 {
        tonic::include_proto!("agentmesh.ratelimit.v1");
    }
}

pub mod eventbus {
    pub mod v1 {
        tonic::include_proto!("agentmesh.eventbus.v1");
    }
}

pub mod scheduler {
    pub mod v1 {
        tonic::include_proto!("agentmesh.scheduler.v1");
    }
}

pub mod rules {
    pub mod v1 {
        tonic::include_proto!("agentmesh.rules.v1");
    }
}

pub mod cache {
    pub mod v1 {
        tonic::include_proto!("agentmesh.cache.v1");
    }
}

pub mod health {
    pub mod v1 {
        tonic::include_proto!("agentmesh.health.v1");
    }
}

/// gRPC's standard health service (`grpc.health.v1`), with `List` (gRFC A90).
pub mod grpc {
    pub mod health {
        pub mod v1 {
            tonic::include_proto!("grpc.health.v1");
        }
    }
}

pub mod bench {
    pub mod v1 {
        tonic::include_proto!("agentmesh.bench.v1");
    }
}

/// Envoy's rate limit service (RLS v3) and the messages it uses, under Envoy's package names so
/// the gRPC path is `/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.
pub mod envoy {
    pub mod service {
        pub mod ratelimit {
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
            }
        }
    }

    pub mod extensions {
        pub mod common {
            pub mod ratelimit {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }

    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }

    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
}
