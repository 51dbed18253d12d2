//! agentmesh wire types: protobuf messages, tonic clients and servers, and the encoded file
//! descriptor set that server reflection serves.
#![allow(unreachable_pub, clippy::all, clippy::pedantic, missing_docs)]

/// Encoded `FileDescriptorSet` of every agentmesh proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("agentmesh_descriptor");

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

pub mod bench {
    pub mod v1 {
        tonic::include_proto!("agentmesh.bench.v1");
    }
}
