//! Hostile input. Every string field of every RPC is fed empty, long (10 KiB, close to the
//! service's message limit, and 1 MiB, past it), non-ASCII (characters of every UTF-8 width at
//! and across each length limit, emoji, right-to-left and bidi marks), NUL and other control
//! characters, and invalid UTF-8 (hand-encoded bytes: proto3 forbids it, the wire allows it).
//!
//! Each case asserts its exact answer, so SQLite and PostgreSQL must agree: a status the service
//! chose (INVALID_ARGUMENT naming the field, NOT_FOUND, ...), a verdict for VerifyKey, or OUT_OF_RANGE
//! from tonic past the message limit. Never a reset stream, UNKNOWN or INTERNAL, and never an
//! answer whose message grew with the input. Afterwards the server still issues and verifies.

use key_authority::pb;
use prost::Message as _;
use prost::bytes::{Buf as _, BufMut as _, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use crate::common::{
    ADMIN_TOKEN, TestApp, TestDb, code, key_of, keys_as, on_both_databases, test_config,
};

/// What a call got, reduced to what the tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// The call succeeded (any RPC but VerifyKey).
    Ok,
    /// VerifyKey answered with this verdict.
    Verdict(pb::VerifyCode),
    /// A refusal: its code, its ErrorInfo reason and `field` (empty when absent), and whether
    /// its message stayed short (at most 512 bytes, whatever the input's size).
    Refused {
        code: Code,
        reason: String,
        field: String,
        short_message: bool,
    },
}

const MAX_MESSAGE_BYTES: usize = 512;

fn refused(code: Code, reason: &str, field: &str) -> Answer {
    Answer::Refused {
        code,
        reason: reason.to_owned(),
        field: field.to_owned(),
        short_message: true,
    }
}

/// INVALID_ARGUMENT naming `field`.
fn invalid(field: &str) -> Answer {
    refused(Code::InvalidArgument, "INVALID_ARGUMENT", field)
}

fn not_found() -> Answer {
    refused(Code::NotFound, "KEY_NOT_FOUND", "")
}

fn bad_page_token() -> Answer {
    refused(Code::InvalidArgument, "INVALID_PAGE_TOKEN", "page_token")
}

/// The request's bytes did not decode (invalid UTF-8 in a string field).
fn malformed() -> Answer {
    refused(Code::InvalidArgument, "MALFORMED_REQUEST", "")
}

/// tonic's own refusal of a message past the service's size limit (no ErrorInfo).
fn too_large() -> Answer {
    refused(Code::OutOfRange, "", "")
}

fn verdict(code: pb::VerifyCode) -> Answer {
    Answer::Verdict(code)
}

fn refusal(status: &Status) -> Answer {
    let info = status.get_details_error_info();
    Answer::Refused {
        code: status.code(),
        reason: info
            .as_ref()
            .map(|info| info.reason.clone())
            .unwrap_or_default(),
        field: info
            .and_then(|info| info.metadata.get("field").cloned())
            .unwrap_or_default(),
        short_message: status.message().len() <= MAX_MESSAGE_BYTES,
    }
}

fn answer<T>(result: Result<tonic::Response<T>, Status>) -> Answer {
    match result {
        Ok(_) => Answer::Ok,
        Err(status) => refusal(&status),
    }
}

/// The cases that got a wrong answer, all reported at the end of a test rather than only the
/// first.
#[derive(Default)]
struct Wrong(Vec<String>);

impl Wrong {
    fn check(&mut self, label: String, got: Answer, expected: Answer) {
        if got != expected {
            self.0.push(format!(
                "{label}\n    got      {got:?}\n    expected {expected:?}"
            ));
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} hostile cases got a wrong answer:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// One call of any RPC, so that one runner can drive every field.
#[derive(Debug, Clone)]
enum Call {
    IssueKey(pb::IssueKeyRequest),
    GetKey(pb::GetKeyRequest),
    ListKeys(pb::ListKeysRequest),
    RevokeKey(pb::RevokeKeyRequest),
    RotateKey(pb::RotateKeyRequest),
    IssueTrialKey(pb::IssueTrialKeyRequest),
    RevokeTrialKey(pb::RevokeTrialKeyRequest),
    VerifyKey(pb::VerifyKeyRequest),
}

impl Call {
    fn path(&self) -> &'static str {
        match self {
            Self::IssueKey(_) => "/keyauthority.v1.KeyService/IssueKey",
            Self::GetKey(_) => "/keyauthority.v1.KeyService/GetKey",
            Self::ListKeys(_) => "/keyauthority.v1.KeyService/ListKeys",
            Self::RevokeKey(_) => "/keyauthority.v1.KeyService/RevokeKey",
            Self::RotateKey(_) => "/keyauthority.v1.KeyService/RotateKey",
            Self::IssueTrialKey(_) => "/keyauthority.v1.KeyService/IssueTrialKey",
            Self::RevokeTrialKey(_) => "/keyauthority.v1.KeyService/RevokeTrialKey",
            Self::VerifyKey(_) => "/keyauthority.v1.VerifyService/VerifyKey",
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Self::IssueKey(request) => request.encode_to_vec(),
            Self::GetKey(request) => request.encode_to_vec(),
            Self::ListKeys(request) => request.encode_to_vec(),
            Self::RevokeKey(request) => request.encode_to_vec(),
            Self::RotateKey(request) => request.encode_to_vec(),
            Self::IssueTrialKey(request) => request.encode_to_vec(),
            Self::RevokeTrialKey(request) => request.encode_to_vec(),
            Self::VerifyKey(request) => request.encode_to_vec(),
        }
    }

    /// A text length that keeps the request just within its service's message limit
    /// (KeyService 64 KiB, VerifyService 16 KiB), with room for the rest of the request.
    fn near_message_limit(&self) -> usize {
        match self {
            Self::VerifyKey(_) => 15 * 1024,
            _ => 60 * 1024,
        }
    }

    /// Sends the call with the generated clients: KeyService as the platform admin (a trusted
    /// front end, so IssueTrialKey honours `client_ip`), VerifyKey without credentials.
    async fn send(self, app: &mut TestApp) -> Answer {
        match self {
            Self::IssueKey(request) => answer(app.keys.issue_key(request).await),
            Self::GetKey(request) => answer(app.keys.get_key(request).await),
            Self::ListKeys(request) => answer(app.keys.list_keys(request).await),
            Self::RevokeKey(request) => answer(app.keys.revoke_key(request).await),
            Self::RotateKey(request) => answer(app.keys.rotate_key(request).await),
            Self::IssueTrialKey(request) => answer(app.keys.issue_trial_key(request).await),
            Self::RevokeTrialKey(request) => answer(app.keys.revoke_trial_key(request).await),
            Self::VerifyKey(request) => match app.verify.verify_key(request).await {
                Ok(response) => verdict(code(response.get_ref())),
                Err(status) => refusal(&status),
            },
        }
    }
}

/// Sends pre-encoded bytes as the request and returns the response's bytes: the only way to put
/// invalid UTF-8 into a string field, which prost's encoder cannot produce.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// Sends `body` to `path` as the platform admin.
async fn send_raw(channel: &Channel, path: &'static str, body: Vec<u8>) -> Answer {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("the channel is ready");
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    let path = http::uri::PathAndQuery::from_static(path);
    answer(grpc.unary::<_, Bytes, _>(request, path, RawCodec).await)
}

/// Byte strings that are not UTF-8: a lone 0xFF, a truncated two-byte sequence, an encoded
/// surrogate, an overlong encoding of '/', and a NUL before a stray continuation byte.
const INVALID_UTF8: &[&[u8]] = &[
    b"\xff",
    b"ok\xc3",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"a\x00\xbf",
];

/// Where a string field sits on the wire.
#[derive(Debug, Clone, Copy)]
enum Wire {
    /// A `string` or `repeated string` field with this number.
    Field(u32),
    /// The key of an entry of the `map<string, string>` field with this number.
    MapKey(u32),
    /// The value of an entry of the `map<string, string>` field with this number.
    MapValue(u32),
}

fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// Appends a length-delimited field. Appended after the rest, it replaces a singular field's
/// value (the last one wins) and adds an element to a repeated or map field.
fn put_field(buf: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    // The key: field number, then wire type 2 (length-delimited).
    put_varint(buf, (u64::from(number) << 3) | 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// A map entry on the wire: a message with the key as field 1 and the value as field 2.
fn map_entry(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut entry = Vec::new();
    put_field(&mut entry, 1, key);
    put_field(&mut entry, 2, value);
    entry
}

impl Wire {
    /// `encoded` with this field's bytes (or the map entry holding them) appended.
    fn append(self, mut encoded: Vec<u8>, raw: &[u8]) -> Vec<u8> {
        match self {
            Self::Field(number) => put_field(&mut encoded, number, raw),
            Self::MapKey(number) => put_field(&mut encoded, number, &map_entry(raw, b"v")),
            Self::MapValue(number) => put_field(&mut encoded, number, &map_entry(b"k", raw)),
        }
        encoded
    }
}

/// The kinds of hostile text every field gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Empty,
    /// 10 KiB of ASCII letters.
    Long,
    /// 10 KiB of two-byte characters.
    LongMultiByte,
    /// As long as the service's message limit allows (about 60 KiB, or 15 KiB for VerifyKey).
    NearMessageLimit,
    /// Emoji, one of them joined with zero-width joiners.
    Emoji,
    /// Arabic between right-to-left and left-to-right marks.
    RightToLeft,
    /// A right-to-left override inside Latin text.
    BidiOverride,
    /// A byte-order mark and a noncharacter (U+FFFF).
    OddCodePoints,
    Nul,
    /// U+0001.
    C0Control,
    /// A terminal escape sequence.
    Escape,
    /// U+007F.
    Delete,
    /// U+0085, a C1 control (NEXT LINE).
    C1Control,
    Tab,
    LineFeed,
    /// CR LF, as a browser submits a textarea's line breaks.
    CarriageReturnLineFeed,
    /// Exactly the field's limit, in characters `width` UTF-8 bytes wide.
    AtLimit {
        width: usize,
    },
    /// One character past the field's limit, in characters `width` UTF-8 bytes wide.
    OverLimit {
        width: usize,
    },
    /// The limit in characters but one byte more: ASCII ending in a two-byte character.
    MixedAtLimit,
}

impl Kind {
    fn is_control(self) -> bool {
        matches!(
            self,
            Self::Nul
                | Self::C0Control
                | Self::Escape
                | Self::Delete
                | Self::C1Control
                | Self::Tab
                | Self::LineFeed
                | Self::CarriageReturnLineFeed
        )
    }

    fn is_line_break_or_tab(self) -> bool {
        matches!(
            self,
            Self::Tab | Self::LineFeed | Self::CarriageReturnLineFeed
        )
    }

    /// Longer than any field's limit (the long kinds are all past 1024 characters).
    fn is_too_long(self) -> bool {
        matches!(
            self,
            Self::Long | Self::LongMultiByte | Self::NearMessageLimit | Self::OverLimit { .. }
        )
    }
}

/// One character of each UTF-8 width.
const WIDE: [(usize, &str); 4] = [(1, "a"), (2, "é"), (3, "€"), (4, "🔑")];

fn hostile_texts(near_message_limit: usize, limit: Option<usize>) -> Vec<(Kind, String)> {
    let mut texts = vec![
        (Kind::Empty, String::new()),
        (Kind::Long, "a".repeat(10 * 1024)),
        (Kind::LongMultiByte, "é".repeat(5 * 1024)),
        (Kind::NearMessageLimit, "a".repeat(near_message_limit)),
        (Kind::Emoji, "key 🔑 👨\u{200d}👩\u{200d}👧".to_owned()),
        (Kind::RightToLeft, "\u{200f}مفتاح\u{200e}".to_owned()),
        (Kind::BidiOverride, "abc\u{202e}def".to_owned()),
        (Kind::OddCodePoints, "\u{feff}x\u{ffff}".to_owned()),
        (Kind::Nul, "a\0b".to_owned()),
        (Kind::C0Control, "a\u{1}b".to_owned()),
        (Kind::Escape, "\u{1b}[31mred".to_owned()),
        (Kind::Delete, "a\u{7f}".to_owned()),
        (Kind::C1Control, "a\u{85}b".to_owned()),
        (Kind::Tab, "a\tb".to_owned()),
        (Kind::LineFeed, "a\nb".to_owned()),
        (Kind::CarriageReturnLineFeed, "a\r\nb".to_owned()),
    ];
    if let Some(limit) = limit {
        for (width, character) in WIDE {
            texts.push((Kind::AtLimit { width }, character.repeat(limit)));
            texts.push((Kind::OverLimit { width }, character.repeat(limit + 1)));
        }
        texts.push((Kind::MixedAtLimit, format!("{}é", "a".repeat(limit - 1))));
    }
    texts
}

/// One string field of one RPC and the answers it must get.
struct Field {
    /// `Rpc.field`, for failure messages.
    name: String,
    /// The request with this field set to the text (everything else valid).
    build: Box<dyn Fn(String) -> Call>,
    wire: Wire,
    /// The field's length limit in characters, for the boundary cases.
    limit: Option<usize>,
    expect: Box<dyn Fn(Kind) -> Answer>,
    /// Cases of this field's own: a label, the text, the answer.
    extra: Vec<(&'static str, String, Answer)>,
}

impl Field {
    fn new(
        name: impl Into<String>,
        wire: Wire,
        limit: Option<usize>,
        build: impl Fn(String) -> Call + 'static,
        expect: impl Fn(Kind) -> Answer + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            build: Box::new(build),
            wire,
            limit,
            expect: Box::new(expect),
            extra: Vec::new(),
        }
    }

    fn with(mut self, label: &'static str, text: impl Into<String>, answer: Answer) -> Self {
        self.extra.push((label, text.into(), answer));
        self
    }

    /// Sends every case, noting each wrong answer in `wrong`.
    async fn run(&self, app: &mut TestApp, wrong: &mut Wrong) {
        let near_limit = (self.build)(String::new()).near_message_limit();
        let mut cases: Vec<(String, String, Answer)> = hostile_texts(near_limit, self.limit)
            .into_iter()
            .map(|(kind, text)| (format!("{kind:?}"), text, (self.expect)(kind)))
            .collect();
        cases.push(("1 MiB".to_owned(), "a".repeat(1024 * 1024), too_large()));
        for (label, text, answer) in &self.extra {
            cases.push(((*label).to_owned(), text.clone(), answer.clone()));
        }
        for (label, text, expected) in cases {
            let got = (self.build)(text).send(app).await;
            wrong.check(format!("{} = {label}", self.name), got, expected);
        }
        for raw in INVALID_UTF8 {
            let call = (self.build)("x".to_owned());
            let body = self.wire.append(call.encode(), raw);
            let got = send_raw(&app.channel, call.path(), body).await;
            let label = format!("{} = invalid UTF-8 {}", self.name, raw.escape_ascii());
            wrong.check(label, got, malformed());
        }
    }
}

fn issue_request() -> pb::IssueKeyRequest {
    pb::IssueKeyRequest {
        workspace_id: "acme".into(),
        name: "ok".into(),
        ..Default::default()
    }
}

/// A RevokeKey request, with every field not named at its default.
#[allow(
    clippy::needless_update,
    reason = "RevokeKeyRequest is gaining fields (revoke_successors); the update keeps this building"
)]
fn revoke_request(workspace_id: String, key_id: String) -> pb::RevokeKeyRequest {
    pb::RevokeKeyRequest {
        workspace_id,
        key_id,
        ..Default::default()
    }
}

/// A RotateKey request, with every field not named at its default.
#[allow(
    clippy::needless_update,
    reason = "RotateKeyRequest is gaining fields (an expiration oneof); the update keeps this building"
)]
fn rotate_request(workspace_id: String, key_id: String) -> pb::RotateKeyRequest {
    pb::RotateKeyRequest {
        workspace_id,
        key_id,
        ..Default::default()
    }
}

/// An id of the right shape that no key has.
const UNKNOWN_KEY_ID: &str = "AAAAAAAAAAAA";

/// Workspace ids: ASCII letters, digits and `-_.`, 1 to 128. `known` answers a valid one.
fn expect_workspace_id(known: Answer) -> impl Fn(Kind) -> Answer {
    move |kind| match kind {
        Kind::AtLimit { width: 1 } => known.clone(),
        _ => invalid("workspace_id"),
    }
}

/// Key ids: empty is a bad request; anything else that is not an issued id is not found.
fn expect_key_id(kind: Kind) -> Answer {
    match kind {
        Kind::Empty => invalid("key_id"),
        _ => not_found(),
    }
}

/// Names: 1 to 128 characters, no control character.
fn expect_name(kind: Kind) -> Answer {
    if kind == Kind::Empty || kind.is_too_long() || kind.is_control() {
        return invalid("name");
    }
    Answer::Ok
}

/// Descriptions and metadata values: up to the limit; tab, LF and CR the only controls.
fn expect_multi_line(field: &'static str) -> impl Fn(Kind) -> Answer {
    move |kind| {
        if kind.is_too_long() || (kind.is_control() && !kind.is_line_break_or_tab()) {
            return invalid(field);
        }
        Answer::Ok
    }
}

fn key_service_fields() -> Vec<Field> {
    let workspace_and_key_id = |rpc: &'static str, build: fn(String, String) -> Call| {
        let workspace = Field::new(
            format!("{rpc}.workspace_id"),
            Wire::Field(1),
            Some(128),
            move |text| build(text, UNKNOWN_KEY_ID.to_owned()),
            expect_workspace_id(not_found()),
        );
        let key_id = Field::new(
            format!("{rpc}.key_id"),
            Wire::Field(2),
            Some(12),
            move |text| build("acme".to_owned(), text),
            expect_key_id,
        )
        .with("an id with NUL", "AAAAAAAAAAA\0", not_found())
        .with(
            "a valid id then a two-byte character",
            "AAAAAAAAAAAAé",
            not_found(),
        );
        [workspace, key_id]
    };
    let mut fields = vec![
        Field::new(
            "IssueKey.workspace_id",
            Wire::Field(1),
            Some(128),
            |workspace_id| {
                Call::IssueKey(pb::IssueKeyRequest {
                    workspace_id,
                    ..issue_request()
                })
            },
            expect_workspace_id(Answer::Ok),
        ),
        Field::new(
            "IssueKey.name",
            Wire::Field(2),
            Some(128),
            |name| {
                Call::IssueKey(pb::IssueKeyRequest {
                    name,
                    ..issue_request()
                })
            },
            expect_name,
        )
        .with("only spaces", "   ", invalid("name")),
        Field::new(
            "IssueKey.description",
            Wire::Field(3),
            Some(1024),
            |description| {
                Call::IssueKey(pb::IssueKeyRequest {
                    description,
                    ..issue_request()
                })
            },
            expect_multi_line("description"),
        ),
        Field::new(
            "IssueKey.scopes",
            Wire::Field(4),
            Some(128),
            |scope| {
                Call::IssueKey(pb::IssueKeyRequest {
                    scopes: vec!["read".to_owned(), scope],
                    ..issue_request()
                })
            },
            |kind| match kind {
                Kind::AtLimit { width: 1 } => Answer::Ok,
                _ => invalid("scopes"),
            },
        )
        .with("every allowed character", "files:read/*._-Z9", Answer::Ok),
        Field::new(
            "IssueKey.metadata key",
            Wire::MapKey(9),
            Some(64),
            |key| {
                Call::IssueKey(pb::IssueKeyRequest {
                    metadata: [(key, "v".to_owned())].into(),
                    ..issue_request()
                })
            },
            |kind| {
                if kind == Kind::Empty || kind.is_too_long() || kind.is_control() {
                    return invalid("metadata");
                }
                Answer::Ok
            },
        ),
        Field::new(
            "IssueKey.metadata value",
            Wire::MapValue(9),
            Some(512),
            |value| {
                Call::IssueKey(pb::IssueKeyRequest {
                    metadata: [("k".to_owned(), value)].into(),
                    ..issue_request()
                })
            },
            expect_multi_line("metadata"),
        ),
        Field::new(
            "ListKeys.workspace_id",
            Wire::Field(1),
            Some(128),
            |workspace_id| {
                Call::ListKeys(pb::ListKeysRequest {
                    workspace_id,
                    ..Default::default()
                })
            },
            expect_workspace_id(Answer::Ok),
        ),
        Field::new(
            "ListKeys.page_token",
            Wire::Field(3),
            None,
            |page_token| {
                Call::ListKeys(pb::ListKeysRequest {
                    workspace_id: "acme".to_owned(),
                    page_token,
                    ..Default::default()
                })
            },
            |kind| match kind {
                Kind::Empty => Answer::Ok,
                _ => bad_page_token(),
            },
        )
        .with(
            "base64 that is no token of ours",
            "AQAAAAAAAAAqQUFBQUFBQUFBQUFBAAAAAAAAAAAAAAAAAAAAAA",
            bad_page_token(),
        ),
        Field::new(
            "IssueTrialKey.name",
            Wire::Field(1),
            Some(128),
            |name| {
                Call::IssueTrialKey(pb::IssueTrialKeyRequest {
                    name,
                    ..Default::default()
                })
            },
            |kind| match kind {
                // Empty means "trial".
                Kind::Empty => Answer::Ok,
                other => expect_name(other),
            },
        ),
        Field::new(
            "IssueTrialKey.client_ip",
            Wire::Field(2),
            None,
            |client_ip| {
                Call::IssueTrialKey(pb::IssueTrialKeyRequest {
                    client_ip,
                    ..Default::default()
                })
            },
            |kind| match kind {
                // Empty means the connection's peer.
                Kind::Empty => Answer::Ok,
                _ => invalid("client_ip"),
            },
        )
        .with("IPv4", "203.0.113.7", Answer::Ok)
        .with("IPv6", "2001:db8::7", Answer::Ok)
        .with("IPv6 with a zone", "fe80::1%eth0", invalid("client_ip"))
        .with("IPv4 with a port", "203.0.113.7:443", invalid("client_ip"))
        .with("IPv4 then NUL", "203.0.113.7\0", invalid("client_ip")),
        Field::new(
            "RevokeTrialKey.prefix",
            Wire::Field(1),
            Some(21),
            |prefix| {
                Call::RevokeTrialKey(pb::RevokeTrialKeyRequest {
                    prefix,
                    ..Default::default()
                })
            },
            |_| invalid("prefix"),
        )
        .with(
            "an unknown trial prefix",
            "ka_trial_AAAAAAAAAAAA",
            not_found(),
        )
        .with(
            "an unknown prefix then NUL",
            "ka_trial_AAAAAAAAAAAA\0",
            not_found(),
        )
        .with(
            "an unknown prefix then 10 KiB",
            format!("ka_trial_AAAAAAAAAAAA{}", "é".repeat(5 * 1024)),
            not_found(),
        )
        .with(
            "a two-byte character across the id's end",
            "ka_trial_AAAAAAAAAAAé",
            invalid("prefix"),
        ),
        Field::new(
            "RevokeTrialKey.client_ip",
            Wire::Field(2),
            None,
            |client_ip| {
                Call::RevokeTrialKey(pb::RevokeTrialKeyRequest {
                    prefix: "ka_trial_AAAAAAAAAAAA".into(),
                    client_ip,
                })
            },
            |kind| match kind {
                // Empty means the connection's peer; the prefix names no key.
                Kind::Empty => not_found(),
                _ => invalid("client_ip"),
            },
        )
        .with("IPv4", "203.0.113.7", not_found())
        .with("IPv6", "2001:db8::7", not_found())
        .with("IPv4 with a port", "203.0.113.7:443", invalid("client_ip"))
        .with("IPv4 then NUL", "203.0.113.7\0", invalid("client_ip")),
    ];
    fields.extend(workspace_and_key_id("GetKey", |workspace_id, key_id| {
        Call::GetKey(pb::GetKeyRequest {
            workspace_id,
            key_id,
        })
    }));
    fields.extend(workspace_and_key_id("RevokeKey", |workspace_id, key_id| {
        Call::RevokeKey(revoke_request(workspace_id, key_id))
    }));
    fields.extend(workspace_and_key_id("RotateKey", |workspace_id, key_id| {
        Call::RotateKey(rotate_request(workspace_id, key_id))
    }));
    fields
}

/// VerifyKey's fields, around `secret`, a valid full-access key.
fn verify_service_fields(secret: &str) -> Vec<Field> {
    let with_key = |secret: String| {
        move |required_scope: String| {
            Call::VerifyKey(pb::VerifyKeyRequest {
                key: secret.clone(),
                required_scopes: vec![required_scope],
                ..Default::default()
            })
        }
    };
    let mut cut = secret.to_owned();
    cut.pop();
    let secret_for_ip = secret.to_owned();
    vec![
        Field::new(
            "VerifyKey.key",
            Wire::Field(1),
            Some(58),
            |key| {
                Call::VerifyKey(pb::VerifyKeyRequest {
                    key,
                    ..Default::default()
                })
            },
            |_| verdict(pb::VerifyCode::Malformed),
        )
        .with("the real key", secret, verdict(pb::VerifyCode::Valid))
        .with(
            "the real key then NUL",
            format!("{secret}\0"),
            verdict(pb::VerifyCode::Malformed),
        )
        .with(
            "the real key ending in a two-byte character",
            format!("{cut}é"),
            verdict(pb::VerifyCode::Malformed),
        ),
        Field::new(
            "VerifyKey.required_scopes",
            Wire::Field(2),
            Some(128),
            with_key(secret.to_owned()),
            |kind| match kind {
                Kind::AtLimit { width: 1 } => verdict(pb::VerifyCode::Valid),
                _ => invalid("required_scopes"),
            },
        ),
        Field::new(
            "VerifyKey.client_ip",
            Wire::Field(3),
            None,
            move |client_ip| {
                Call::VerifyKey(pb::VerifyKeyRequest {
                    key: secret_for_ip.clone(),
                    client_ip,
                    ..Default::default()
                })
            },
            |kind| match kind {
                Kind::Empty => verdict(pb::VerifyCode::Valid),
                _ => invalid("client_ip"),
            },
        )
        .with("IPv4", "198.51.100.1", verdict(pb::VerifyCode::Valid))
        .with(
            "IPv4-mapped IPv6",
            "::ffff:198.51.100.1",
            verdict(pb::VerifyCode::Valid),
        ),
    ]
}

/// A test server whose trial-key rate limits never bite: the trial cases call IssueTrialKey and
/// RevokeTrialKey dozens of times from one address.
async fn spawn(db: &TestDb) -> TestApp {
    let mut config = test_config(db);
    config.auth.trial_limit_per_minute = 1_000_000;
    config.auth.trial_revoke_limit_per_minute = 1_000_000;
    TestApp::spawn_with(config).await
}

/// The server still works: a normal IssueKey, then VerifyKey of the new key.
async fn assert_still_serving(app: &mut TestApp) {
    let issued = app.issue("acme", "after the hostile calls").await;
    let verified = app.verify_key(&issued.secret, &[]).await;
    assert_eq!(code(&verified), pb::VerifyCode::Valid);
}

async fn every_string_field_gets_a_deliberate_answer(db: TestDb) {
    let mut app = spawn(&db).await;
    let mut wrong = Wrong::default();
    for field in key_service_fields() {
        field.run(&mut app, &mut wrong).await;
    }
    let full_access = app.issue("acme", "full access").await;
    for field in verify_service_fields(&full_access.secret) {
        field.run(&mut app, &mut wrong).await;
    }
    wrong.assert_none();
    assert_still_serving(&mut app).await;
    app.stop().await;
}

fn duration(seconds: i64, nanos: i32) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos }
}

/// Durations a request may carry that no valid one is: negative, mixed signs, unnormalised
/// nanos, past protobuf's 10,000 years, and the extremes of i64 (i64::MIN seconds panicked).
const HOSTILE_DURATIONS: &[(i64, i32)] = &[
    (i64::MIN, 0),
    (i64::MIN, i32::MIN),
    (i64::MAX, 999_999_999),
    (i64::MAX, i32::MAX),
    (315_576_000_001, 0),
    (-1, 0),
    (0, -1),
    (5, -1),
    (-5, 1),
    (0, 1_000_000_000),
    (0, i32::MIN),
];

async fn numbers_durations_and_timestamps_get_a_deliberate_answer(db: TestDb) {
    use pb::issue_key_request::Expiration;
    let mut app = spawn(&db).await;
    let issue = |expiration: Expiration| {
        Call::IssueKey(pb::IssueKeyRequest {
            expiration: Some(expiration),
            ..issue_request()
        })
    };
    let mut cases: Vec<(String, Call, Answer)> = Vec::new();
    for &(seconds, nanos) in HOSTILE_DURATIONS {
        cases.push((
            format!("ttl {seconds} s {nanos} ns"),
            issue(Expiration::Ttl(duration(seconds, nanos))),
            invalid("ttl"),
        ));
    }
    let timestamp = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
    for (seconds, nanos) in [
        (i64::MIN, 0),
        (i64::MAX, 0),
        // 10000-01-01T00:00:00Z, one second past protobuf's last Timestamp.
        (253_402_300_800, 0),
        (4_000_000_000, -1),
        (4_000_000_000, 1_000_000_000),
    ] {
        cases.push((
            format!("expire_time {seconds} s {nanos} ns"),
            issue(Expiration::ExpireTime(timestamp(seconds, nanos))),
            invalid("expire_time"),
        ));
    }
    // In protobuf's range, but further away than --max-key-lifetime (10 years by default); the
    // validation tests show it accepted with the limit off.
    cases.push((
        "expire_time at protobuf's last instant".to_owned(),
        issue(Expiration::ExpireTime(timestamp(
            253_402_300_799,
            999_999_999,
        ))),
        invalid("expire_time"),
    ));
    for (value, expected) in [(i64::MIN, invalid("usage_limit")), (i64::MAX, Answer::Ok)] {
        cases.push((
            format!("usage_limit {value}"),
            Call::IssueKey(pb::IssueKeyRequest {
                usage_limit: value,
                ..issue_request()
            }),
            expected,
        ));
    }
    for value in [i32::MIN, i32::MAX, -1] {
        cases.push((
            format!("role {value}"),
            Call::IssueKey(pb::IssueKeyRequest {
                role: value,
                ..issue_request()
            }),
            invalid("role"),
        ));
        cases.push((
            format!("environment {value}"),
            Call::IssueKey(pb::IssueKeyRequest {
                environment: value,
                ..issue_request()
            }),
            invalid("environment"),
        ));
    }
    for (value, expected) in [(i32::MIN, invalid("page_size")), (i32::MAX, Answer::Ok)] {
        cases.push((
            format!("page_size {value}"),
            Call::ListKeys(pb::ListKeysRequest {
                workspace_id: "acme".to_owned(),
                page_size: value,
                ..Default::default()
            }),
            expected,
        ));
    }
    // Refused before the key is read, so one key serves every case.
    let rotatable = key_of(&app.issue("acme", "rotatable").await).key_id.clone();
    for &(seconds, nanos) in HOSTILE_DURATIONS {
        cases.push((
            format!("grace_period {seconds} s {nanos} ns"),
            Call::RotateKey(pb::RotateKeyRequest {
                grace_period: Some(duration(seconds, nanos)),
                ..rotate_request("acme".to_owned(), rotatable.clone())
            }),
            invalid("grace_period"),
        ));
    }
    let unlimited = app.issue("acme", "unlimited").await.secret;
    let limited = app
        .issue_with(pb::IssueKeyRequest {
            usage_limit: 5,
            ..issue_request()
        })
        .await
        .secret;
    for (label, key, cost, expected) in [
        ("cost i64::MIN", &unlimited, i64::MIN, invalid("cost")),
        (
            "cost i64::MAX, unlimited key",
            &unlimited,
            i64::MAX,
            verdict(pb::VerifyCode::Valid),
        ),
        (
            "cost i64::MAX, limited key",
            &limited,
            i64::MAX,
            verdict(pb::VerifyCode::UsageExhausted),
        ),
    ] {
        cases.push((
            label.to_owned(),
            Call::VerifyKey(pb::VerifyKeyRequest {
                key: key.clone(),
                cost: Some(cost),
                ..Default::default()
            }),
            expected,
        ));
    }
    let mut wrong = Wrong::default();
    for (label, call, expected) in cases {
        wrong.check(label, call.send(&mut app).await, expected);
    }
    wrong.assert_none();
    // The refused rotations left the key as it was.
    let key = app.get("acme", &rotatable).await.unwrap();
    assert_eq!(key.rotated_to_key_id, "");
    assert_still_serving(&mut app).await;
    app.stop().await;
}

async fn hostile_credentials_get_a_deliberate_answer(db: TestDb) {
    let mut app = spawn(&db).await;
    let get = || pb::GetKeyRequest {
        workspace_id: "acme".to_owned(),
        key_id: UNKNOWN_KEY_ID.to_owned(),
    };
    let unauthenticated = |reason| refused(Code::Unauthenticated, reason, "");
    let not_a_key = format!("ka_live_{}", "A".repeat(50));
    let cases: Vec<(&str, Vec<u8>, Answer)> = vec![
        (
            "a 10 KiB token",
            format!("Bearer {}", "a".repeat(10 * 1024)).into_bytes(),
            unauthenticated("INVALID_CREDENTIALS"),
        ),
        (
            "a key-shaped token with a wrong checksum",
            format!("Bearer {not_a_key}").into_bytes(),
            unauthenticated("INVALID_CREDENTIALS"),
        ),
        (
            "a JWT-shaped token without JWTs configured",
            b"Bearer a.b.c".to_vec(),
            unauthenticated("INVALID_CREDENTIALS"),
        ),
        (
            // Not ASCII, so not readable as a Bearer token at all.
            "UTF-8 bytes in the token",
            "Bearer clé".as_bytes().to_vec(),
            unauthenticated("MISSING_AUTH_HEADER"),
        ),
        (
            "bytes that are not UTF-8",
            b"Bearer \xff\xfe".to_vec(),
            unauthenticated("MISSING_AUTH_HEADER"),
        ),
        (
            "a tab instead of a space",
            format!("Bearer\t{ADMIN_TOKEN}").into_bytes(),
            unauthenticated("MISSING_AUTH_HEADER"),
        ),
        (
            "the scheme alone",
            b"Bearer".to_vec(),
            unauthenticated("MISSING_AUTH_HEADER"),
        ),
    ];
    // A client whose interceptor adds no credentials of its own.
    let mut anonymous = keys_as(&app.channel, None);
    let mut wrong = Wrong::default();
    for (label, header, expected) in cases {
        let mut request = tonic::Request::new(get());
        let value = MetadataValue::try_from(header.as_slice()).expect("a valid header value");
        request.metadata_mut().insert("authorization", value);
        wrong.check(
            label.to_owned(),
            answer(anonymous.get_key(request).await),
            expected,
        );
    }
    // An API key acting in another workspace is refused; the refusal quotes only the start of
    // the workspace id it was sent.
    let developer = app
        .issue_with(pb::IssueKeyRequest {
            role: pb::Role::Developer as i32,
            ..issue_request()
        })
        .await
        .secret;
    let mut as_key = keys_as(&app.channel, Some(&developer));
    for (label, workspace_id) in [
        ("60 KiB", "a".repeat(60 * 1024)),
        ("30 Ki two-byte characters", "é".repeat(30 * 1024)),
        ("NUL", "a\0b".to_owned()),
    ] {
        let got = answer(
            as_key
                .get_key(pb::GetKeyRequest {
                    workspace_id,
                    ..get()
                })
                .await,
        );
        let expected = refused(Code::PermissionDenied, "WORKSPACE_MISMATCH", "");
        wrong.check(
            format!("API key in a foreign workspace: {label}"),
            got,
            expected,
        );
    }
    wrong.assert_none();
    assert_still_serving(&mut app).await;
    app.stop().await;
}

/// The refusal of an undecodable request says which message and field failed, and nothing else.
async fn malformed_requests_name_the_message_and_field(db: TestDb) {
    let app = spawn(&db).await;
    let body = Wire::Field(2).append(Call::IssueKey(issue_request()).encode(), b"\xff");
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<_, Bytes, _>(
            tonic::Request::new(body),
            http::uri::PathAndQuery::from_static("/keyauthority.v1.KeyService/IssueKey"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "malformed request: failed to decode Protobuf message: IssueKeyRequest.name: \
         invalid string value: data is not UTF-8 encoded"
    );
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.reason, "MALFORMED_REQUEST");
    assert_eq!(info.domain, "keyauthority.v1");
    app.stop().await;
}

on_both_databases!(
    malformed_requests_name_the_message_and_field,
    every_string_field_gets_a_deliberate_answer,
    numbers_durations_and_timestamps_get_a_deliberate_answer,
    hostile_credentials_get_a_deliberate_answer,
);
