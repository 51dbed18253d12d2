//! A dedicated Redis connection for blocking stream reads, with its own RESP2 reader.
//!
//! Durable delivery reads every event back with `XREADGROUP`, a dozen RESP values per entry.
//! redis-rs parses replies with a general parser-combinator and builds a `Value` tree of owned
//! buffers; at a hundred thousand events a second that parse was a quarter of the event bus's
//! CPU (measured with `perf`). Replies read here are scanned in place: a [`Frame`] borrows the
//! connection's read buffer, and the caller copies out only what it keeps.
//!
//! Only what a blocking read needs: TCP or Unix socket, `AUTH` and `SELECT` from the client's
//! connection info, one command at a time, RESP2 replies.
//!
//! [`Pipe`] is the other use: one connection on which requests are pipelined in the order
//! [`Pipe::send`] was called — a synchronous call, so a caller can start an append, start the
//! next, and only then wait for either (redis-rs's multiplexed connection queues a request when
//! its future is first polled, which gives no such order between two requests in flight).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use redis::ConnectionAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// A RESP2 value borrowing the bytes it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    /// `+OK`
    Simple(&'a [u8]),
    /// `-ERR …`
    Error(&'a [u8]),
    /// `:1`
    Integer(i64),
    /// `$3\r\nabc`
    Bulk(&'a [u8]),
    /// `$-1` or `*-1`
    Nil,
    /// `*2\r\n…`
    Array(Vec<Frame<'a>>),
}

/// Deepest nesting accepted (stream replies nest four deep).
const MAX_DEPTH: usize = 16;

/// Parses one frame at the start of `buf`: the frame and the bytes it took, `None` when `buf`
/// does not hold all of it yet.
///
/// # Errors
/// Bytes that are not RESP2.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, String> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Frame<'_>, usize)>, String> {
    if depth > MAX_DEPTH {
        return Err("reply nested too deep".to_owned());
    }
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(line_end) = find_crlf(buf, pos + 1) else {
        return Ok(None);
    };
    let line = &buf[pos + 1..line_end];
    let next = line_end + 2;
    let number = || -> Result<i64, String> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad RESP length {:?}", String::from_utf8_lossy(line)))
    };
    match kind {
        b'+' => Ok(Some((Frame::Simple(line), next))),
        b'-' => Ok(Some((Frame::Error(line), next))),
        b':' => Ok(Some((Frame::Integer(number()?), next))),
        b'$' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Some((Frame::Nil, next)));
            };
            let end = next + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err("bulk string not followed by CRLF".to_owned());
            }
            Ok(Some((Frame::Bulk(&buf[next..end]), end + 2)))
        }
        b'*' => {
            let Ok(count) = usize::try_from(number()?) else {
                return Ok(Some((Frame::Nil, next)));
            };
            // Each element takes at least 3 bytes: never reserve more than the buffer holds.
            let mut items = Vec::with_capacity(count.min(buf.len() / 3));
            let mut at = next;
            for _ in 0..count {
                let Some((item, after)) = parse_at(buf, at, depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                at = after;
            }
            Ok(Some((Frame::Array(items), at)))
        }
        other => Err(format!("unexpected RESP type byte {other:#04x}")),
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    rest.windows(2).position(|w| w == b"\r\n").map(|i| from + i)
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Why a call on a [`RawConnection`] failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The connection broke or sent something unreadable: discard it.
    Io(io::Error),
    /// Redis answered with an error; the connection is fine.
    Redis(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Redis(m) => f.write_str(m),
        }
    }
}

/// Appends `args` to `out` as one RESP command (an array of bulk strings).
pub(crate) fn write_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    write_header(out, b'*', args.len());
    for arg in args {
        write_bulk(out, arg);
    }
}

/// `*n\r\n` or `$n\r\n`.
pub(crate) fn write_header(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        // A decimal digit: n % 10 < 10.
        #[allow(clippy::cast_possible_truncation, reason = "n % 10 < 10")]
        let digit = (n % 10) as u8;
        digits[at] = b'0' + digit;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// One bulk string.
pub(crate) fn write_bulk(out: &mut Vec<u8>, arg: &[u8]) {
    write_header(out, b'$', arg.len());
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// One reply of a pipelined request: a value, or the error Redis answered with.
pub(crate) type Reply = Result<redis::Value, String>;

/// The replies to one [`Pipe::send`], or why the connection failed.
pub(crate) type Replies = Result<Vec<Reply>, String>;

struct PipeRequest {
    packed: Vec<u8>,
    replies: usize,
    done: oneshot::Sender<Replies>,
}

/// One connection with requests pipelined in call order; see the module docs. It connects on
/// first use and again on the next request after it broke (requests in flight then fail).
/// `prelude` (packed commands) is sent first on every new connection and its replies are
/// dropped: the event log loads its append script there, so a restarted Redis has it before
/// any request can meet `NOSCRIPT`.
pub(crate) struct Pipe {
    info: redis::ConnectionInfo,
    timeout: Duration,
    prelude: Arc<[u8]>,
    prelude_replies: usize,
    queue: parking_lot::Mutex<Option<mpsc::UnboundedSender<PipeRequest>>>,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe").finish_non_exhaustive()
    }
}

impl Pipe {
    pub(crate) fn new(
        info: redis::ConnectionInfo,
        timeout: Duration,
        prelude: Vec<u8>,
        prelude_replies: usize,
    ) -> Self {
        Self {
            info,
            timeout,
            prelude: prelude.into(),
            prelude_replies,
            queue: parking_lot::Mutex::new(None),
        }
    }

    /// Queues `packed` (`replies` commands) behind every request sent before; the receiver
    /// gets their replies. Must be called within a tokio runtime (it may start the
    /// connection's task).
    pub(crate) fn send(&self, packed: Vec<u8>, replies: usize) -> oneshot::Receiver<Replies> {
        let (done, answer) = oneshot::channel();
        let mut request = PipeRequest {
            packed,
            replies,
            done,
        };
        let mut queue = self.queue.lock();
        loop {
            if let Some(tx) = queue.as_ref() {
                match tx.send(request) {
                    Ok(()) => return answer,
                    // The connection's task ended (it broke): start another.
                    Err(mpsc::error::SendError(back)) => request = back,
                }
            }
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run_pipe(
                self.info.clone(),
                self.timeout,
                self.prelude.clone(),
                self.prelude_replies,
                rx,
            ));
            *queue = Some(tx);
        }
    }
}

/// Serves one connection of a [`Pipe`] until it breaks, then fails every request waiting.
async fn run_pipe(
    info: redis::ConnectionInfo,
    timeout: Duration,
    prelude: Arc<[u8]>,
    prelude_replies: usize,
    mut requests: mpsc::UnboundedReceiver<PipeRequest>,
) {
    let (waiting_tx, mut waiting) = mpsc::unbounded_channel::<(usize, Option<PipeRequest>)>();
    let failure = match RawConnection::connect(&info, timeout).await {
        Err(e) => format!("cannot connect: {e}"),
        Ok(conn) => {
            let RawConnection { stream, mut buf } = conn;
            let (mut reader, mut writer) = tokio::io::split(stream);
            let write = async {
                if prelude_replies > 0 {
                    let _ = waiting_tx.send((prelude_replies, None));
                    writer.write_all(&prelude).await?;
                }
                while let Some(first) = requests.recv().await {
                    let mut packed = Vec::new();
                    let mut next = Some(first);
                    while let Some(mut request) = next.take() {
                        if packed.is_empty() {
                            packed = std::mem::take(&mut request.packed);
                        } else {
                            packed.extend_from_slice(&request.packed);
                        }
                        let _ = waiting_tx.send((request.replies, Some(request)));
                        if packed.len() < 1 << 20 {
                            next = requests.try_recv().ok();
                        }
                    }
                    writer.write_all(&packed).await?;
                }
                Ok::<_, io::Error>(())
            };
            let read = async {
                while let Some((count, request)) = waiting.recv().await {
                    let mut replies = Vec::with_capacity(count);
                    while replies.len() < count {
                        match next_frame(&mut reader, &mut buf, owned).await {
                            Ok(reply) => replies.push(reply),
                            Err(e) => return e,
                        }
                    }
                    if let Some(request) = request {
                        let _ = request.done.send(Ok(replies));
                    }
                }
                io::ErrorKind::BrokenPipe.into()
            };
            tokio::select! {
                written = write => match written {
                    Ok(()) => return, // the pipe was dropped
                    Err(e) => format!("connection broke: {e}"),
                },
                e = read => format!("connection broke: {e}"),
            }
        }
    };
    // New requests go to a new connection; every one sent here fails.
    requests.close();
    waiting.close();
    while let Ok((_, request)) = waiting.try_recv() {
        if let Some(request) = request {
            let _ = request.done.send(Err(failure.clone()));
        }
    }
    while let Ok(request) = requests.try_recv() {
        let _ = request.done.send(Err(failure.clone()));
    }
}

/// Reads the next frame from `reader` into `buf` (more when `buf` holds only part of it) and
/// hands it to `take`; the frame's bytes are then dropped from `buf`.
async fn next_frame<R: AsyncRead + Unpin, T>(
    reader: &mut R,
    buf: &mut BytesMut,
    take: impl FnOnce(Frame<'_>) -> T,
) -> io::Result<T> {
    loop {
        match parse(buf) {
            Ok(Some((frame, used))) => {
                let out = take(frame);
                buf.advance(used);
                return Ok(out);
            }
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// An owned copy of `frame`; an error reply is `Err` with its message.
fn owned(frame: Frame<'_>) -> Reply {
    use redis::Value;
    Ok(match frame {
        Frame::Error(message) => return Err(String::from_utf8_lossy(message).into_owned()),
        Frame::Simple(b"OK") => Value::Okay,
        Frame::Simple(text) => Value::SimpleString(String::from_utf8_lossy(text).into_owned()),
        Frame::Integer(n) => Value::Int(n),
        Frame::Bulk(bytes) => Value::BulkString(bytes.to_vec()),
        Frame::Nil => Value::Nil,
        Frame::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|item| owned(item).unwrap_or_else(Value::SimpleString))
                .collect(),
        ),
    })
}

/// One connection, one command at a time.
pub(crate) struct RawConnection {
    stream: Box<dyn Stream>,
    buf: BytesMut,
}

impl std::fmt::Debug for RawConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConnection").finish_non_exhaustive()
    }
}

impl RawConnection {
    /// Connects to what `info` names (TCP or Unix socket) within `timeout`, then
    /// authenticates and selects the database as it says.
    pub(crate) async fn connect(
        info: &redis::ConnectionInfo,
        timeout: Duration,
    ) -> Result<Self, CallError> {
        let open = async {
            let stream: Box<dyn Stream> = match info.addr() {
                ConnectionAddr::Tcp(host, port) => {
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    tcp.set_nodelay(true)?;
                    Box::new(tcp)
                }
                #[cfg(unix)]
                ConnectionAddr::Unix(path) => {
                    Box::new(tokio::net::UnixStream::connect(path).await?)
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("unsupported redis address {other:?}"),
                    ));
                }
            };
            Ok(stream)
        };
        let stream = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| CallError::Io(io::Error::new(io::ErrorKind::TimedOut, "connect")))?
            .map_err(CallError::Io)?;
        let mut conn = Self {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            auth.arg(password);
            conn.handshake(&auth, timeout).await?;
        }
        if settings.db() != 0 {
            conn.handshake(redis::cmd("SELECT").arg(settings.db()), timeout)
                .await?;
        }
        Ok(conn)
    }

    async fn handshake(&mut self, cmd: &redis::Cmd, timeout: Duration) -> Result<(), CallError> {
        let packed = cmd.get_packed_command();
        let call = self.call(&packed, |_| ());
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| CallError::Io(io::Error::new(io::ErrorKind::TimedOut, "handshake")))?
    }

    /// Sends one packed command and hands its reply to `read` (an error reply is
    /// [`CallError::Redis`]).
    pub(crate) async fn call<T>(
        &mut self,
        packed: &[u8],
        read: impl FnOnce(Frame<'_>) -> T,
    ) -> Result<T, CallError> {
        self.stream.write_all(packed).await.map_err(CallError::Io)?;
        next_frame(&mut self.stream, &mut self.buf, |frame| match frame {
            Frame::Error(message) => Err(CallError::Redis(
                String::from_utf8_lossy(message).into_owned(),
            )),
            frame => Ok(read(frame)),
        })
        .await
        .map_err(CallError::Io)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_frames_parse_in_place_and_incomplete_input_asks_for_more() {
        // One XREADGROUP reply (stream `key`, entry `1-0` with field `id` = ""), then the
        // start of the next reply, which is not part of it.
        let reply =
            b"*1\r\n*2\r\n$3\r\nkey\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$2\r\nid\r\n$0\r\n\r\n:7\r\n";
        let (frame, used) = parse(reply).unwrap().unwrap();
        assert_eq!(used, reply.len() - 4);
        let entry = Frame::Array(vec![
            Frame::Bulk(b"1-0"),
            Frame::Array(vec![Frame::Bulk(b"id"), Frame::Bulk(b"")]),
        ]);
        assert_eq!(
            frame,
            Frame::Array(vec![Frame::Array(vec![
                Frame::Bulk(b"key"),
                Frame::Array(vec![entry]),
            ])])
        );
        for cut in 0..used {
            assert_eq!(parse(&reply[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(
            parse(b"$-1\r\n").unwrap(),
            Some((Frame::Nil, 5)),
            "nil bulk"
        );
        assert_eq!(parse(b"*-1\r\n").unwrap(), Some((Frame::Nil, 5)));
        assert_eq!(
            parse(b"-NOGROUP no such key\r\n").unwrap(),
            Some((Frame::Error(b"NOGROUP no such key"), 22))
        );
        assert_eq!(parse(b":-3\r\n").unwrap(), Some((Frame::Integer(-3), 5)));
        assert!(parse(b"?x\r\n").is_err());
        assert!(
            parse(b"$3\r\nabcd\r\n").is_err(),
            "bulk longer than its length"
        );
        assert!(parse(b"$x\r\n").is_err());
    }
}
