//! WebSocket (HTTP/1.1 `Upgrade: websocket`): passed through to the assigned variant. Once its upstream
//! answers `101 Switching Protocols`, the client's connection and a connection of the
//! upstream's own become one tunnel, copied both ways until either side closes.
//!
//! `Connection` and `Upgrade` are hop-by-hop headers, stripped from every other request;
//! here they are the request, so they are put back on both sides of the exchange.

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Response, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::upstream::Lease;
use crate::wire::lists;

/// A client's request to switch protocols, taken from its request.
pub struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
}

impl Upgrade {
    /// The WebSocket upgrade an HTTP/1.1 request asks for, if any: `Connection: upgrade` and
    /// `Upgrade: websocket`. Other upgrades (`h2c`, which `curl --http2` offers) are only
    /// offers: the request is served as it is, over HTTP/1.1.
    pub fn requested(parts: &mut Parts) -> Option<Upgrade> {
        if parts.version != Version::HTTP_11 {
            return None;
        }
        let lists_in = |name, token| {
            parts
                .headers
                .get_all(name)
                .iter()
                .any(|value| lists(value.as_bytes(), token))
        };
        let websocket = lists_in(header::UPGRADE, b"websocket");
        if !websocket {
            return None;
        }
        let asks = lists_in(header::CONNECTION, b"upgrade");
        let protocol = parts.headers.get(header::UPGRADE)?.clone();
        if !asks {
            return None;
        }
        let client = parts.extensions.remove::<OnUpgrade>()?;
        Some(Upgrade { protocol, client })
    }

    /// Puts the upgrade back on the request to the upstream.
    pub fn ask(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
    }

    /// The upstream agreed (`101`): joins the two connections into a tunnel that lives on its
    /// own task, holding the upstream's `lease` until it ends; the `101` goes back to the
    /// client with the upgrade headers restored.
    pub fn tunnel<B>(self, upstream: &mut Response<B>, lease: Lease) {
        let Some(upstream_side) = upstream.extensions_mut().remove::<OnUpgrade>() else {
            return;
        };
        let headers = upstream.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if !headers.contains_key(header::UPGRADE) {
            headers.insert(header::UPGRADE, self.protocol.clone());
        }
        let client_side = self.client;
        tokio::spawn(async move {
            let _lease = lease;
            let (client, upstream) = match tokio::try_join!(client_side, upstream_side) {
                Ok(both) => both,
                Err(err) => {
                    tracing::debug!(error = %err, "upgrade did not complete");
                    return;
                }
            };
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %err, "upgraded connection ended");
            }
        });
    }
}
