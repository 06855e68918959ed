//! Chunks over HTTP(S): when a deployment gives a base URL (`DownloadPolicy::http`), the
//! chunks the download machine asks for are fetched as byte ranges of `{base}/{sha256}` (the
//! fleet server's `/files`, or any static host or CDN holding the files) instead of over
//! MQTT. A few workers, each on one kept-alive connection (hyper's HTTP/1.1 client, rustls
//! with the agent's fleet CA for `https`), take jobs from one queue; each answer is checked
//! before it is handed on (`206`, the exact `Content-Range` asked, the exact length; the
//! download machine then checks the digest). What fails is reported so the driver can fall
//! back to MQTT. The workers end when the [`Fetcher`] is dropped.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::sync::{mpsc, Mutex};

/// Longest a fetch may take, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Fetches in flight at once (one connection each).
pub const WORKERS: usize = 4;

/// One chunk to fetch.
#[derive(Debug, Clone)]
pub struct Job {
    /// The download it belongs to (its artifact's digest, hex).
    pub artifact: String,
    /// Its index in the download.
    pub index: u32,
    /// The file's URL (`{base}/{sha256 of the file}`).
    pub url: String,
    /// Where the chunk lies in that file.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// The file's length (the `Content-Range` must say it).
    pub file_size: u64,
}

/// A fetch's result.
#[derive(Debug)]
pub enum Fetched {
    /// The bytes of the range asked (not yet checked against the digest).
    Chunk {
        /// The download.
        artifact: String,
        /// The chunk's index in it.
        index: u32,
        /// Its bytes.
        data: Bytes,
    },
    /// It could not be had.
    Failed {
        /// The download.
        artifact: String,
        /// The chunk's index in it.
        index: u32,
        /// Why.
        error: FetchError,
    },
}

/// Why a range could not be fetched.
#[derive(Debug, Error)]
pub enum FetchError {
    /// The URL does not parse, or is not `http`/`https` with a host.
    #[error("bad URL {0:?}")]
    Url(String),
    /// `https` without a TLS configuration in the agent.
    #[error("https needs the agent's [tls] configuration")]
    NoTls,
    /// No connection (refused, reset, DNS) or the TLS handshake failed.
    #[error("cannot connect to {host}: {reason}")]
    Connect {
        /// Host and port.
        host: String,
        /// Why.
        reason: String,
    },
    /// The exchange failed midway.
    #[error("HTTP exchange failed: {0}")]
    Http(String),
    /// An answer other than `206 Partial Content` (a `200` is the whole file: the host
    /// ignored the range).
    #[error("the host answered {0} instead of 206 Partial Content")]
    Status(u16),
    /// A `Content-Range` other than the range asked.
    #[error("the host sent {found:?} for bytes {start}-{end}/{size}")]
    WrongRange {
        /// The header received (or empty).
        found: String,
        /// First byte asked.
        start: u64,
        /// Last byte asked.
        end: u64,
        /// The file's length.
        size: u64,
    },
    /// A body longer or shorter than the range.
    #[error("the host sent {found} bytes for a range of {expected}")]
    Length {
        /// Bytes received (at least; reading stops past the range).
        found: usize,
        /// Bytes asked.
        expected: u32,
    },
    /// No answer within [`FETCH_TIMEOUT`].
    #[error("no answer within {}s", FETCH_TIMEOUT.as_secs())]
    Timeout,
}

/// The queue of chunk fetches, and the workers that carry them out.
pub struct Fetcher {
    jobs: mpsc::Sender<Job>,
}

impl Fetcher {
    /// Starts [`WORKERS`] workers; their results come on the receiver. `tls` (the agent's,
    /// with its fleet CA) is used for `https`.
    pub fn start(tls: Option<rustls::ClientConfig>) -> (Fetcher, mpsc::Receiver<Fetched>) {
        let (jobs, queue) = mpsc::channel::<Job>(1024);
        let (results, fetched) = mpsc::channel(1024);
        let queue = Arc::new(Mutex::new(queue));
        let tls = tls.map(|mut c| {
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(c))
        });
        for _ in 0..WORKERS {
            tokio::spawn(worker(queue.clone(), results.clone(), tls.clone()));
        }
        (Fetcher { jobs }, fetched)
    }

    /// Queues `job`; false if the queue is full (the chunk is then asked again later).
    pub fn fetch(&self, job: Job) -> bool {
        self.jobs.try_send(job).is_ok()
    }
}

/// A kept-alive connection to one origin.
struct Connection {
    origin: String,
    sender: SendRequest<Empty<Bytes>>,
}

async fn worker(
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    results: mpsc::Sender<Fetched>,
    tls: Option<tokio_rustls::TlsConnector>,
) {
    let mut conn: Option<Connection> = None;
    loop {
        let Some(job) = queue.lock().await.recv().await else {
            return; // The fetcher was dropped: shutting down.
        };
        let fetched =
            match tokio::time::timeout(FETCH_TIMEOUT, fetch(&job, &mut conn, tls.as_ref())).await {
                Ok(r) => r,
                Err(_) => Err(FetchError::Timeout),
            };
        let out = match fetched {
            Ok(data) => Fetched::Chunk {
                artifact: job.artifact,
                index: job.index,
                data,
            },
            Err(error) => {
                conn = None; // Whatever state it is in, it is not reused.
                Fetched::Failed {
                    artifact: job.artifact,
                    index: job.index,
                    error,
                }
            }
        };
        if results.send(out).await.is_err() {
            return;
        }
    }
}

async fn fetch(
    job: &Job,
    conn: &mut Option<Connection>,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Bytes, FetchError> {
    let uri: Uri = job
        .url
        .parse()
        .map_err(|_| FetchError::Url(job.url.clone()))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(FetchError::Url(job.url.clone())),
    };
    let host = uri
        .host()
        .ok_or_else(|| FetchError::Url(job.url.clone()))?
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let origin = format!("{}://{host}:{port}", if https { "https" } else { "http" });
    let reusable = conn
        .as_ref()
        .is_some_and(|c| c.origin == origin && !c.sender.is_closed());
    if !reusable {
        *conn = Some(Connection {
            sender: connect(&host, port, https, tls).await?,
            origin,
        });
    }
    let sender = &mut conn.as_mut().expect("connected").sender;
    sender
        .ready()
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let (start, end) = (job.offset, job.offset + u64::from(job.len) - 1);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(header::HOST, uri.authority().map_or("", |a| a.as_str()))
        .header(header::RANGE, format!("bytes={start}-{end}"))
        .header(
            header::USER_AGENT,
            concat!("modelcast-agent/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Url(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    if response.status() != StatusCode::PARTIAL_CONTENT {
        return Err(FetchError::Status(response.status().as_u16()));
    }
    let found = response
        .headers()
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if found.trim() != format!("bytes {start}-{end}/{}", job.file_size) {
        return Err(FetchError::WrongRange {
            found,
            start,
            end,
            size: job.file_size,
        });
    }
    // Read no more than the range (and one frame past it, to tell a longer body).
    let mut body = response.into_body();
    let mut data = Vec::with_capacity(job.len as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| FetchError::Http(e.to_string()))?;
        if let Ok(bytes) = frame.into_data() {
            data.extend_from_slice(&bytes);
            if data.len() > job.len as usize {
                break;
            }
        }
    }
    if data.len() != job.len as usize {
        return Err(FetchError::Length {
            found: data.len(),
            expected: job.len,
        });
    }
    Ok(Bytes::from(data))
}

/// A new HTTP/1.1 connection to `host:port`, over TLS for `https`.
async fn connect(
    host: &str,
    port: u16,
    https: bool,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<SendRequest<Empty<Bytes>>, FetchError> {
    let failed = |reason: String| FetchError::Connect {
        host: format!("{host}:{port}"),
        reason,
    };
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| failed(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    if https {
        let tls = tls.ok_or(FetchError::NoTls)?;
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| failed(e.to_string()))?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| failed(e.to_string()))?;
        handshake(TokioIo::new(stream)).await
    } else {
        handshake(TokioIo::new(tcp)).await
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Empty<Bytes>>, FetchError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    // The connection is driven until either side closes it (the sender dropped with the
    // worker, or the host hung up).
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
