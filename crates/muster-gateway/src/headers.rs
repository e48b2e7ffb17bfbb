//! Header rewriting between client and instance (RFC 9110 §7.6.1): hop-by-hop
//! headers stay on their hop, and the client's address, host and scheme travel on
//! as `X-Forwarded-*`. Pure functions over header maps.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1, plus
/// the de-facto `Proxy-Connection` and `Keep-Alive`).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Removes the hop-by-hop headers, including every header the `Connection`
/// header names, and `Upgrade` (a relayed upgrade puts it back with
/// [`ask_upgrade`]).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_options(headers)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// The options of every `Connection` header, trimmed (RFC 9110 §7.6.1).
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The protocol a request asks to switch to (`Upgrade: websocket` with `upgrade`
/// among the `Connection` options, RFC 9110 §7.8), if it asks for one.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = connection_options(headers).any(|option| option.eq_ignore_ascii_case("upgrade"));
    let protocol = headers.get(header::UPGRADE)?;
    (asks && !protocol.as_bytes().iter().all(u8::is_ascii_whitespace)).then(|| protocol.clone())
}

/// Sets `Connection: upgrade` and `Upgrade: {protocol}`, the two headers of an
/// upgrade on the next hop (a request to the instance, or its 101 answer to the
/// client).
pub fn ask_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Prepares a client's request headers for the instance: hop-by-hop headers and
/// `Host` removed (the instance's address becomes the host), the client's
/// address appended to `X-Forwarded-For`, and `X-Forwarded-Host` /
/// `X-Forwarded-Proto` (`scheme`, the gateway's own: `http` or `https`) set unless a
/// proxy in front already set them.
pub fn upstream_request_headers(headers: &mut HeaderMap, client: IpAddr, host: Option<&str>, scheme: &'static str) {
    remove_hop_by_hop(headers);
    let original_host = headers.remove(header::HOST);

    let client = client.to_canonical().to_string();
    let earlier: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let chain = if earlier.is_empty() {
        client
    } else {
        format!("{}, {client}", earlier.join(", "))
    };
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }

    if !headers.contains_key(&X_FORWARDED_HOST) {
        let host = original_host.or_else(|| host.and_then(|h| HeaderValue::from_str(h).ok()));
        if let Some(host) = host {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut headers = map(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
            ("content-type", "text/plain"),
        ]);
        remove_hop_by_hop(&mut headers);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept", "content-type"]);
    }

    #[test]
    fn an_upgrade_is_asked_only_with_the_connection_option_and_a_protocol() {
        let asked = map(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(requested_upgrade(&asked).unwrap(), "websocket");
        assert_eq!(requested_upgrade(&map(&[("upgrade", "websocket")])), None);
        assert_eq!(requested_upgrade(&map(&[("connection", "upgrade")])), None);
        assert_eq!(
            requested_upgrade(&map(&[("connection", "upgrade"), ("upgrade", " ")])),
            None
        );

        let mut headers = asked.clone();
        remove_hop_by_hop(&mut headers);
        assert!(headers.is_empty());
        ask_upgrade(&mut headers, requested_upgrade(&asked).unwrap());
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "websocket");
    }

    #[test]
    fn forwarded_headers_are_added_and_an_existing_chain_is_appended_to() {
        let mut headers = map(&[("host", "api.example"), ("x-forwarded-for", "10.0.0.1")]);
        upstream_request_headers(&mut headers, "192.0.2.7".parse().unwrap(), None, "http");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(headers["x-forwarded-host"], "api.example");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert!(!headers.contains_key("host"));
    }

    #[test]
    fn headers_set_by_a_proxy_in_front_are_kept() {
        let mut headers = map(&[
            ("x-forwarded-host", "public.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "10.0.0.1"),
        ]);
        upstream_request_headers(
            &mut headers,
            "::ffff:127.0.0.1".parse().unwrap(),
            Some("ignored"),
            "http",
        );
        assert_eq!(headers["x-forwarded-for"], "203.0.113.1, 10.0.0.1, 127.0.0.1");
        assert_eq!(headers["x-forwarded-host"], "public.example");
        assert_eq!(headers["x-forwarded-proto"], "https");
    }
}
