//! Load on a device's inference API: several clients send the same KServe v2 request in a
//! loop, and every answer is kept with its latency and the version that gave it. Used by the
//! zero-downtime swap test and by the `bench-swap` benchmark.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use modelcast_proto::manifest::TensorData;

/// Answers at most this many requests per client, whatever the time limit.
const MAX_SHOTS_PER_CLIENT: usize = 2_000_000;

/// A keep-alive HTTP client for one model's `/v2/models/{name}/infer`.
pub struct InferClient {
    http: ureq::Agent,
    url: String,
    body: serde_json::Value,
}

impl InferClient {
    /// A client for `model` on the agent listening on 127.0.0.1:`port`, sending `inputs`.
    pub fn new(port: u16, model: &str, inputs: &[TensorData]) -> InferClient {
        let inputs: Vec<serde_json::Value> = inputs
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "shape": t.shape, "datatype": "FP32",
                    "data": t.values().expect("tensor values"),
                })
            })
            .collect();
        InferClient {
            http: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into(),
            url: format!("http://127.0.0.1:{port}/v2/models/{model}/infer"),
            body: serde_json::json!({ "inputs": inputs }),
        }
    }

    /// The same client for one version of the model: a number, or a label (`stable`,
    /// `canary`): `/v2/models/{name}/versions/{version}/infer`.
    pub fn version(mut self, version: &str) -> InferClient {
        let base = self.url.trim_end_matches("/infer");
        self.url = format!("{base}/versions/{version}/infer");
        self
    }

    /// One request: the version that answered and the first output's values, or the error
    /// (transport error, or the status and body of a non-200 answer).
    pub fn call(&self) -> Result<(String, Vec<f64>), String> {
        self.call_with(None)
    }

    /// [`InferClient::call`] with one more request header (`(name, value)`).
    pub fn call_with(&self, header: Option<(&str, &str)>) -> Result<(String, Vec<f64>), String> {
        let mut request = self.http.post(&self.url);
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        let mut resp = request.send_json(&self.body).map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.body_mut().read_json().map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("{status}: {body}"));
        }
        let version = body["model_version"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let data = body["outputs"][0]["data"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
            .unwrap_or_default();
        Ok((version, data))
    }
}

/// One request and its answer.
#[derive(Debug, Clone)]
pub struct Shot {
    /// Which client sent it.
    pub client: usize,
    /// When it was sent, from the start of the hammer.
    pub sent: Duration,
    /// How long the answer took.
    pub latency: Duration,
    /// The answering version and output, or the error.
    pub answer: Result<(String, Vec<f64>), String>,
}

/// Clients in threads, each sending requests back to back until stopped.
pub struct Hammer {
    stop: Arc<AtomicBool>,
    start: Instant,
    threads: Vec<JoinHandle<Vec<Shot>>>,
}

impl Hammer {
    /// Starts `clients` clients against `model` on 127.0.0.1:`port`, each waiting `pause`
    /// between an answer and its next request; each stops by itself after `limit`.
    pub fn start(
        port: u16,
        model: &str,
        inputs: &[TensorData],
        clients: usize,
        pause: Duration,
        limit: Duration,
    ) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let threads = (0..clients)
            .map(|client| {
                let http = InferClient::new(port, model, inputs);
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut shots = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && start.elapsed() < limit
                        && shots.len() < MAX_SHOTS_PER_CLIENT
                    {
                        let sent = start.elapsed();
                        let answer = http.call();
                        shots.push(Shot {
                            client,
                            sent,
                            latency: start.elapsed() - sent,
                            answer,
                        });
                        std::thread::sleep(pause);
                    }
                    shots
                })
            })
            .collect();
        Hammer {
            stop,
            start,
            threads,
        }
    }

    /// Time since the clients started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Stops the clients; returns every shot, in the order they were sent.
    pub fn stop(self) -> Vec<Shot> {
        self.stop.store(true, Ordering::Relaxed);
        let mut shots: Vec<Shot> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("hammer client"))
            .collect();
        shots.sort_by_key(|s| s.sent);
        shots
    }
}

/// The `p`-quantile (0..=1) of `latencies`, nearest rank; zero when empty.
pub fn quantile(latencies: &[Duration], p: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&ms, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&ms, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&ms, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&ms[..1], 0.99), Duration::from_millis(1));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
