//! The codec of our gRPC servers: tonic-prost's, except for a request that does not decode.
//!
//! tonic-prost turns every protobuf decode error into INTERNAL (as gRPC's status code table says
//! for "error parsing request proto"). To a caller that reads as our bug, when the bytes it sent
//! are at fault: most often a `string` field that is not UTF-8, which proto3 forbids but the
//! wire allows. Our servers answer INVALID_ARGUMENT with the ErrorInfo reason MALFORMED_REQUEST
//! and prost's description of what failed (message and field), like any other bad request.
//!
//! `build.rs` selects this codec for the generated servers only; the generated clients keep
//! tonic-prost's, for which an undecodable *response* is rightly INTERNAL.

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::error::Error;

/// tonic-prost's codec with decode errors answered as MALFORMED_REQUEST.
#[derive(Debug)]
pub struct ServerCodec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Default for ServerCodec<T, U> {
    fn default() -> Self {
        Self {
            prost: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ServerCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder {
            prost: self.prost.decoder(),
        }
    }
}

/// Decodes a request with prost; a failure is the caller's malformed request.
#[derive(Debug)]
pub struct RequestDecoder<U> {
    prost: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        // ProstDecoder fails only when prost cannot decode the bytes; its message is prost's
        // description, e.g. "failed to decode Protobuf message: IssueKeyRequest.name: invalid
        // string value: data is not UTF-8 encoded". It names our types, nothing internal.
        self.prost
            .decode(buf)
            .map_err(|status| Error::MalformedRequest(status.message().to_owned()).into())
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.prost.buffer_settings()
    }
}
