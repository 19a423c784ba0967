//! Sending one generation to a backend: rank the healthy backends for the request's adapter,
//! start it on the best one, and move on to the next when a backend is down or full. A backend
//! that does not know a desired adapter (it restarted and has not been re-applied yet) gets it
//! loaded first. Nothing is returned to the client until the backend has produced its first
//! message, so a request that fails early can still be retried elsewhere.

use crate::Gateway;
use crate::admin::load_request;
use crate::cluster;
use crate::error::{Code, Error};
use crate::policy::Route;
use crate::upstream::{GenerateCall, Piece, TokenStream, UpstreamCode, UpstreamError};
use futures::StreamExt;
use std::sync::Arc;

/// Most backends one request is tried on.
pub const MAX_ATTEMPTS: usize = 3;

/// Counts a request against its backend's queue depth while it runs.
#[derive(Debug)]
pub struct InFlight {
    gw: Arc<Gateway>,
    backend: String,
}

impl InFlight {
    fn new(gw: &Arc<Gateway>, backend: &str) -> InFlight {
        gw.with_view(backend, |v| v.in_flight += 1);
        InFlight { gw: gw.clone(), backend: backend.to_string() }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gw.with_view(&self.backend, |v| v.in_flight = v.in_flight.saturating_sub(1));
    }
}

/// A generation that has started on a backend.
#[derive(Debug)]
pub struct Started {
    pub backend: String,
    /// The backend's first message, already received.
    pub first: Option<Piece>,
    pub rest: TokenStreamHolder,
    pub in_flight: InFlight,
}

/// The rest of the stream (a newtype so [`Started`] can derive `Debug`).
pub struct TokenStreamHolder(pub TokenStream);

impl std::fmt::Debug for TokenStreamHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenStream")
    }
}

/// The failure a backend's refusal of a generation is for the client. `request` (when the
/// refusal is of starting it) lets a refused field be named as the client called it.
pub fn generation_error(backend: &str, e: &UpstreamError, request: Option<&GenerateCall>) -> Error {
    match e.code {
        UpstreamCode::InvalidArgument => {
            let param = match (e.field.as_deref(), request.and_then(|r| r.constraint.as_ref())) {
                (Some("constraint"), Some(c)) => Some(c.from),
                _ => None,
            };
            let message = match param {
                Some(param) => format!("{param}: {}", e.message),
                None => e.message.clone(),
            };
            Error::invalid(message, param)
        }
        UpstreamCode::NotFound => Error::new(Code::ModelNotFound, e.message.clone()).at(Some("model")),
        UpstreamCode::FailedPrecondition | UpstreamCode::ResourceExhausted => {
            Error::new(Code::BackendBusy, format!("backend {backend} is busy: {}", e.message))
        }
        UpstreamCode::Unavailable | UpstreamCode::Timeout | UpstreamCode::Fenced => {
            Error::new(Code::BackendUnavailable, format!("backend {backend} is unavailable: {}", e.message))
        }
        UpstreamCode::PermissionDenied | UpstreamCode::Other => {
            Error::new(Code::BackendError, format!("backend {backend}: {}", e.message))
        }
    }
}

async fn attempt(gw: &Arc<Gateway>, address: &str, request: &GenerateCall) -> Result<Started, UpstreamError> {
    let backend = gw
        .members
        .upstream(address)
        .ok_or_else(|| UpstreamError::new(UpstreamCode::Unavailable, format!("backend {address} left the fleet")))?;
    let in_flight = InFlight::new(gw, address);
    let mut stream = backend.generate(request.clone()).await?;
    let first = stream.next().await.transpose()?;
    Ok(Started { backend: backend.address().to_string(), first, rest: TokenStreamHolder(stream), in_flight })
}

/// Reorders `ranked` (indices into `views`, best first by readiness and load) by the cost of
/// serving `request` on each, given the part of its prompt each caches ([`crate::prefix`]);
/// backends less ready for the request's adapter stay behind the readiest. The prompt goes on
/// as the token ids the first candidate computed. Any failure leaves the order as it was.
async fn by_cached_prefix(
    gw: &Arc<Gateway>,
    views: &[cluster::BackendView],
    ranked: &mut [usize],
    request: &mut GenerateCall,
) {
    let adapter = request.adapter.as_deref();
    if let Some(name) = adapter
        && !ranked.iter().any(|&i| views[i].adapters.get(name).is_some_and(|a| a.weights_digest.is_some()))
    {
        // No backend has said what its weights are: nothing can be cached under them.
        return;
    }
    let Some(upstream) = gw.members.upstream(&views[ranked[0]].address) else { return };
    let tokens = match upstream.tokenize(&request.prompt).await {
        Ok(tokens) => tokens,
        Err(e) => {
            tracing::debug!(backend = %upstream.address(), error = %e, "could not tokenize for prefix routing; routing by load");
            return;
        }
    };
    let candidates: Vec<&cluster::BackendView> = ranked.iter().map(|&i| &views[i]).collect();
    let cached = gw.prefixes.cached_for(&candidates, adapter, &request.cache_salt, &tokens);
    let best_fit = views[ranked[0]].fit(adapter);
    let ready = ranked.iter().take_while(|&&i| views[i].fit(adapter) == best_fit).count();
    let mut costed: Vec<(usize, usize, u32)> =
        ranked[..ready].iter().zip(&cached).map(|(&i, &c)| (i, c, views[i].queue_depth())).collect();
    crate::prefix::order_by_cost(&mut costed, tokens.len(), gw.options.prefix_queue_cost);
    for (slot, (i, ..)) in ranked.iter_mut().zip(costed) {
        *slot = i;
    }
    request.prompt = crate::upstream::Prompt::Tokens(tokens);
}

/// Starts `request` on the best backend for `route`, giving up (and cancelling it there) when
/// no first token has come within the gateway's `first_token_timeout`.
pub async fn start(gw: &Arc<Gateway>, route: &Route, request: GenerateCall) -> Result<Started, Error> {
    let limit = gw.options.first_token_timeout;
    // Dropping the attempt in flight drops its stream, which cancels the generation on the
    // backend.
    tokio::time::timeout(limit, start_within(gw, route, request)).await.unwrap_or_else(|_| {
        Err(Error::new(
            Code::FirstTokenTimeout,
            format!(
                "no first token within {} ms; the request was cancelled on the backend (the gateway's --first-token-timeout-ms)",
                limit.as_millis()
            ),
        ))
    })
}

async fn start_within(gw: &Arc<Gateway>, route: &Route, mut request: GenerateCall) -> Result<Started, Error> {
    request.adapter.clone_from(&route.adapter);
    let views = gw.views();
    let mut ranked = cluster::rank(&views, route.adapter.as_deref(), route.backend.as_deref());
    if gw.options.prefix_routing && ranked.len() > 1 {
        by_cached_prefix(gw, &views, &mut ranked, &mut request).await;
    }
    let candidates: Vec<&str> = ranked.into_iter().map(|i| views[i].address.as_str()).collect();
    if candidates.is_empty() {
        let message = match &route.backend {
            Some(b) => format!("backend {b} chosen by the routing policy is not healthy"),
            None => "no backend is healthy".to_string(),
        };
        return Err(Error::new(Code::NoBackend, message));
    }
    let mut last = None;
    for &address in candidates.iter().take(MAX_ATTEMPTS) {
        let mut result = attempt(gw, address, &request).await;
        if let (Err(e), Some(name)) = (&result, &route.adapter)
            && e.code == UpstreamCode::NotFound
            && let Some(lora) = gw.loras.get(name)
        {
            // The backend does not know this desired adapter (yet). The leader loads it there and
            // retries; another gateway may not (one actor drives the backends), so it tries the
            // next backend, or answers that the adapter is on its way.
            let placed = crate::cluster::placement(name, lora.replicas, &gw.views()).iter().any(|p| p == address);
            result = match gw.leadership.token().filter(|_| placed) {
                Some(fence) => {
                    tracing::info!(backend = %address, adapter = %name, "loading a desired adapter the backend lacks");
                    let loaded = match gw.members.upstream(address) {
                        Some(backend) => {
                            let turn = gw.turn(name);
                            let _turn = turn.lock().await;
                            backend.load_adapter(load_request(gw, &lora, fence)).await
                        }
                        None => Err(UpstreamError::new(UpstreamCode::Unavailable, "the backend left the fleet")),
                    };
                    match loaded {
                        Ok(_) => attempt(gw, address, &request).await,
                        Err(e) => Err(e),
                    }
                }
                None => Err(UpstreamError::new(
                    UpstreamCode::ResourceExhausted,
                    format!("adapter {name} is not on this backend; the leading gateway places it"),
                )),
            };
        }
        match result {
            Ok(started) => return Ok(started),
            Err(e) => {
                tracing::warn!(backend = %address, code = ?e.code, error = %e, "generation could not start");
                if e.is_backend_failure() {
                    gw.with_view(address, |v| v.fail(e.message.clone()));
                    gw.metrics.backend_health(address, false);
                } else if e.code != UpstreamCode::ResourceExhausted {
                    return Err(generation_error(address, &e, Some(&request)));
                }
                last = Some((address, e));
            }
        }
    }
    let (address, e) = last
        .unwrap_or_else(|| ("", UpstreamError::new(UpstreamCode::Unavailable, "no backend could take the request")));
    Err(generation_error(address, &e, Some(&request)))
}
