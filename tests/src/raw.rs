//! A gRPC client that sends frames as given (valid protobuf or not), for tests of what servers
//! do with bytes no generated client would send.

use std::net::SocketAddr;

use bytes::{Buf, BufMut};
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Bytes in, bytes out: each message is a frame's payload, untouched.
#[derive(Debug, Default, Clone)]
pub struct RawCodec;

/// Writes a frame's bytes as they are.
#[derive(Debug, Default)]
pub struct RawEncoder;

/// Reads a frame's bytes as they are.
#[derive(Debug, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn client(
    addr: SocketAddr,
) -> anyhow::Result<tonic::client::Grpc<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(tonic::client::Grpc::new(channel))
}

/// Calls the unary method `path` (`/package.Service/Method`) with `frame` as the request.
///
/// # Errors
/// Fails when the server cannot be reached.
pub async fn unary(
    addr: SocketAddr,
    path: &'static str,
    frame: Vec<u8>,
) -> anyhow::Result<Result<Vec<u8>, Status>> {
    let mut grpc = client(addr).await?;
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static(path);
    Ok(grpc
        .unary(tonic::Request::new(frame), path, RawCodec)
        .await
        .map(tonic::Response::into_inner))
}

/// Opens the bidirectional method `path` and sends `frames`, then closes the request side;
/// returns every answer received and the status the stream ended with (OK for a clean end).
///
/// # Errors
/// Fails when the server cannot be reached.
pub async fn streaming(
    addr: SocketAddr,
    path: &'static str,
    frames: Vec<Vec<u8>>,
) -> anyhow::Result<(Vec<Vec<u8>>, Status)> {
    streaming_with(addr, path, frames, None).await
}

/// [`streaming`] with `authorization: Bearer <bearer>` when given.
///
/// # Errors
/// Fails when the server cannot be reached.
pub async fn streaming_with(
    addr: SocketAddr,
    path: &'static str,
    frames: Vec<Vec<u8>>,
    bearer: Option<&str>,
) -> anyhow::Result<(Vec<Vec<u8>>, Status)> {
    let mut grpc = client(addr).await?;
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static(path);
    let mut request = tonic::Request::new(tokio_stream::iter(frames));
    if let Some(token) = bearer {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    let mut answers = Vec::new();
    let mut inbound = match grpc.streaming(request, path, RawCodec).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok((answers, status)),
    };
    let end = loop {
        match inbound.next().await {
            Some(Ok(answer)) => answers.push(answer),
            Some(Err(status)) => break status,
            None => break Status::ok(""),
        }
    };
    Ok((answers, end))
}

/// Two bytes that are not a valid protobuf message: field 1 with wire type 7 (none such).
pub const UNDECODABLE: [u8; 2] = [0x0f, 0x00];
