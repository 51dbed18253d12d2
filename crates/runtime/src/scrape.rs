//! Reading a service's admin HTTP endpoints from tools and tests (a `GET` through hyper), the
//! Prometheus text exposition parsed by `prometheus-parse`, and the one `POST` the services
//! send (webhooks: the health aggregator's notifications, reactive rules' responses).
//!
//! `meshctl bench` reads server histograms over a run with it and the test harness reads
//! `/livez`, `/readyz` and `/metrics` with it, so neither carries its own HTTP or text-format
//! code.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

pub use prometheus_parse::{HistogramCount, Sample, Scrape, Value};

/// Why a `GET` did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// The URL is not `http[s]://host[:port][/path]`.
    #[error("{0}: only http:// and https://host[:port][/path] URLs are read")]
    Url(String),
    /// Connecting, sending or reading failed.
    #[error("{url}: {source}")]
    Io {
        /// The URL asked for.
        url: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No whole answer within the timeout.
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, Duration),
}

/// A `GET` of `http://host:port/path` (a bare `host:port` means `/metrics`); the status code
/// and the body as text (lossy UTF-8). One connection per call: these are occasional reads.
///
/// # Errors
/// [`GetError`] when the URL is not plain HTTP, the server cannot be reached or the answer
/// does not arrive within `timeout`.
pub async fn get(url: &str, timeout: Duration) -> Result<(u16, String), GetError> {
    get_with(url, timeout, None).await
}

/// [`get`] sending `authorization: Bearer <bearer>` when given (a cluster run with
/// `--auth-metrics token`).
///
/// # Errors
/// As [`get`].
pub async fn get_with(
    url: &str,
    timeout: Duration,
    bearer: Option<&str>,
) -> Result<(u16, String), GetError> {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    let mut headers = vec![(http::header::ACCEPT.as_str(), "text/plain")];
    if let Some(value) = &authorization {
        headers.push((http::header::AUTHORIZATION.as_str(), value.as_str()));
    }
    request(
        http::Method::GET,
        url,
        &headers,
        bytes::Bytes::new(),
        timeout,
    )
    .await
}

/// A `POST` of `body` to `http[s]://host[:port][/path]` with `headers`; the status code and
/// the answer's body as text. One connection per call (webhooks).
///
/// # Errors
/// As [`get`].
pub async fn post(
    url: &str,
    headers: &[(&str, &str)],
    body: bytes::Bytes,
    timeout: Duration,
) -> Result<(u16, String), GetError> {
    request(http::Method::POST, url, headers, body, timeout).await
}

/// One HTTP/1.1 exchange over a new connection (TLS for `https://`, and for `http://` when the
/// process's client TLS is set); a bare `host:port` `GET` reads `/metrics`.
async fn request(
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: bytes::Bytes,
    timeout: Duration,
) -> Result<(u16, String), GetError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    if rest.contains("://") || rest.is_empty() {
        return Err(GetError::Url(url.to_owned()));
    }
    let default_path = if method == http::Method::GET {
        "metrics"
    } else {
        ""
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, default_path));
    // A host without a port: the scheme's.
    let host_port;
    let host = if host.contains(':') && !host.ends_with(']') {
        host
    } else {
        host_port = format!(
            "{host}:{}",
            if url.starts_with("https://") { 443 } else { 80 }
        );
        host_port.as_str()
    };
    // Origin form (`/path`), with the host in `Host`, as HTTP/1.1 servers expect from clients.
    let uri = format!("/{path}");
    let io_error = |e: Box<dyn std::error::Error + Send + Sync>| GetError::Io {
        url: url.to_owned(),
        source: e,
    };
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| io_error(e.into()))?;
        // `https://` URLs (a JWKS URL, a webhook) use TLS with the system's roots and the
        // process's CA; with the process's client TLS set, admin ports are read over TLS too.
        let tls = if url.starts_with("https://") {
            Some(crate::tls::https_public())
        } else {
            crate::tls::https_client()
        };
        let driver = if let Some(tls) = tls {
            let name = host
                .rsplit_once(':')
                .map_or(host, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| io_error(e.into()))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| io_error(e.into()))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| io_error(e.into()))?;
            (
                sender,
                tokio::spawn(async move { connection.await.map(|_| ()) }),
            )
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| io_error(e.into()))?;
            (
                sender,
                tokio::spawn(async move { connection.await.map(|_| ()) }),
            )
        };
        let (mut sender, driver) = driver;
        let mut request = http::Request::builder()
            .method(method)
            .uri(uri.as_str())
            .header(http::header::HOST, host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| io_error(e.into()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| io_error(e.into()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| io_error(e.into()))?
            .to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| GetError::Timeout(url.to_owned(), timeout))?
}

/// Parses a Prometheus text exposition. Histogram buckets (of families with a `# TYPE`
/// line) come grouped as one [`Value::Histogram`] sample per label set, named after the
/// family; every other line is one sample.
///
/// # Errors
/// Never for text in memory; the `io::Result` is the parser's.
pub fn parse(text: &str) -> std::io::Result<Scrape> {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
}

/// The value of the sample `name` whose labels include every `(label, value)` in `labels`,
/// summed over the samples that match (0 when none does). Counters, gauges and untyped
/// samples only.
#[must_use]
pub fn sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .filter_map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP calls_total Calls.
# TYPE calls_total counter
calls_total{path="local",result="allow"} 3
calls_total{path="forwarded",result="allow"} 4
calls_total{path="local",result="deny"} 5
# HELP wait_seconds Wait.
# TYPE wait_seconds histogram
wait_seconds_bucket{priority="low",le="0.001"} 2
wait_seconds_bucket{priority="low",le="+Inf"} 7
wait_seconds_sum{priority="low"} 0.5
wait_seconds_count{priority="low"} 7
"#;

    #[test]
    fn test_counters_sum_over_the_samples_whose_labels_match() {
        let scrape = parse(TEXT).unwrap();
        assert_eq!(sum(&scrape, "calls_total", &[("result", "allow")]), 7.0);
        assert_eq!(sum(&scrape, "calls_total", &[("path", "local")]), 8.0);
        assert_eq!(sum(&scrape, "calls_total", &[]), 12.0);
        assert_eq!(sum(&scrape, "missing", &[]), 0.0);
    }

    #[test]
    fn test_histogram_buckets_are_grouped_per_label_set() {
        let scrape = parse(TEXT).unwrap();
        let buckets: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "wait_seconds")
            .filter_map(|s| match &s.value {
                Value::Histogram(h) => Some(h.iter().map(|b| (b.less_than, b.count)).collect()),
                _ => None,
            })
            .collect::<Vec<Vec<_>>>();
        assert_eq!(buckets, vec![vec![(0.001, 2.0), (f64::INFINITY, 7.0)]]);
    }

    #[tokio::test]
    async fn test_get_reads_status_and_body_and_names_what_failed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/livez", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (code, body) = get(&format!("http://{addr}/livez"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((code, body.as_str()), (200, "ok"));
        let (code, _) = get(&format!("{addr}/nothing"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(code, 404);
        assert!(matches!(
            get("ftp://x/y", Duration::from_secs(1)).await,
            Err(GetError::Url(_))
        ));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let err = get(&gone.to_string(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with(&gone.to_string()), "{err}");
    }
}
