//! The codec every agentmesh server decodes requests with.

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Prefix of the message of a request that is not valid protobuf.
pub const UNDECODABLE: &str = "undecodable message";

/// `tonic_prost::ProstCodec`, except that a request that is not valid protobuf (a truncated
/// field, invalid UTF-8 in a string, nesting past the recursion limit) is `INVALID_ARGUMENT`:
/// it is the caller's mistake, and tonic's `INTERNAL` reads as a server fault that is worth
/// retrying. (gRPC's status-code table lists INTERNAL for this; Google's own APIs answer
/// INVALID_ARGUMENT, and so do we.) The generated servers use it; clients keep `ProstCodec`.
#[derive(Debug, Clone)]
pub struct ServerCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for ServerCodec<T, U> {
    fn default() -> Self {
        Self {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ServerCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ServerDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ServerDecoder {
            inner: self.inner.decoder(),
        }
    }
}

/// Decodes requests; an undecodable one is `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct ServerDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: Message + Default> Decoder for ServerDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner
            .decode(buf)
            .map_err(|s| Status::invalid_argument(format!("{UNDECODABLE}: {}", s.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
