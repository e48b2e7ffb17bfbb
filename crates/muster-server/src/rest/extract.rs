//! Reading REST requests — JSON bodies, path segments, query strings — into typed
//! values, and the one JSON error shape every REST failure answers with:
//!
//! ```json
//! {"error": {"field": "port", "message": "must be between 1 and 65535, got 0"}}
//! ```
//!
//! `field` names what was wrong as the client spelled it (`body` when the request
//! body as a whole is, `null` when no field is to blame). Statuses come from
//! [`ApiError::http_status`]; malformed input is 400 and an oversized body 413.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;
use crate::http::MAX_BODY_BYTES;

/// A failed REST request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct RestError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The field at fault, if one is.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// For 503s: when to retry.
    pub retry_after_ms: Option<u64>,
}

impl RestError {
    /// A 400 naming `field`.
    pub fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        RestError {
            status: StatusCode::BAD_REQUEST,
            field: Some(field.into()),
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// A 404 naming `field`.
    pub fn not_found(field: impl Into<String>, message: impl Into<String>) -> Self {
        RestError {
            status: StatusCode::NOT_FOUND,
            field: Some(field.into()),
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// A 413: the body is larger than [`MAX_BODY_BYTES`].
    pub fn body_too_large() -> Self {
        RestError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            field: Some("body".into()),
            message: format!("request body is larger than {MAX_BODY_BYTES} bytes"),
            retry_after_ms: None,
        }
    }
}

/// The field an [`ApiError`] is about, if any.
pub fn api_error_field(e: &ApiError) -> Option<String> {
    match e {
        ApiError::Invalid(v) => Some(v.field.clone()),
        ApiError::LeaseNotFound(_) | ApiError::LeaseExists(_) => Some("lease_id".into()),
        ApiError::InstanceNotFound(_) => Some("instance_id".into()),
        _ => None,
    }
}

impl From<ApiError> for RestError {
    fn from(e: ApiError) -> Self {
        let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after_ms = match &e {
            ApiError::NoLeader { retry_after_ms, .. } => Some(*retry_after_ms),
            ApiError::ShuttingDown => Some(1000),
            _ => None,
        };
        let message = match &e {
            // The field is named separately; say only what is wrong with it.
            ApiError::Invalid(v) => v.reason.clone(),
            other => other.to_string(),
        };
        RestError {
            status,
            field: api_error_field(&e),
            message,
            retry_after_ms,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    field: Option<&'a str>,
    message: &'a str,
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                field: self.field.as_deref(),
                message: &self.message,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is left unread, so the connection cannot serve
            // another request: said, so that a client does not put it back in its
            // pool and fail its next request on it.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(ms) = self.retry_after_ms {
            // Retry-After counts whole seconds.
            if let Ok(v) = HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

/// Parses a JSON document into `T`, naming the field at fault on failure: the path
/// serde reached for a wrong type (`port`, `tags[2]`), the field itself when one is
/// missing or unknown, and `body` when the document is not JSON at all.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RestError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(RestError::bad_request("body", "a JSON object is required"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_error(&path, &inner)
    })?;
    de.end()
        .map_err(|e| RestError::bad_request("body", format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// Converts an already parsed JSON value into `T`, naming the field at fault like
/// [`parse_json`] does.
pub fn from_json_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, RestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_error(&path, &inner)
    })
}

fn json_error(path: &str, e: &serde_json::Error) -> RestError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            RestError::bad_request("body", format!("malformed JSON: {e}"))
        }
        Category::Data => {
            let message = e.to_string();
            let field = if path.is_empty() || path == "." {
                quoted_field(&message, "unknown field `")
                    .or_else(|| quoted_field(&message, "missing field `"))
                    .unwrap_or_else(|| "body".to_string())
            } else {
                path.to_string()
            };
            RestError::bad_request(field, message)
        }
    }
}

/// The name in serde's "unknown field `name`" / "missing field `name`" messages.
fn quoted_field(message: &str, prefix: &str) -> Option<String> {
    let rest = &message[message.find(prefix)? + prefix.len()..];
    Some(rest[..rest.find('`')?].to_string())
}

/// A JSON object as request body, read up to [`MAX_BODY_BYTES`] (413 beyond) and
/// parsed with [`parse_json`]. The content type is not checked, so `curl -d` works as
/// it is; anything but an object (an array, a number) is refused naming `body`.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = RestError;

    async fn from_request(request: Request, state: &S) -> Result<Self, RestError> {
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                RestError::body_too_large()
            } else {
                RestError::bad_request("body", rejection.body_text())
            }
        })?;
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None | Some(b'{') => parse_json(&bytes).map(JsonBody),
            Some(_) if serde_json::from_slice::<serde_json::Value>(&bytes).is_ok() => {
                Err(RestError::bad_request("body", "the request body must be a JSON object"))
            }
            Some(_) => parse_json(&bytes).map(JsonBody),
        }
    }
}

/// Path parameters; a failure answers the REST error shape (400 naming `path`).
pub struct PathParams<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = RestError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, RestError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParams(p.0))
            .map_err(|rejection| RestError::bad_request("path", rejection.body_text()))
    }
}

/// The query string as name/value pairs, taken one by one; whatever is left at the
/// end is an unknown parameter and refused, so a typo (`?tags=`) is not silently
/// ignored.
pub struct QueryParams {
    pairs: Vec<(String, String)>,
}

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = RestError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, RestError> {
        let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|e| RestError::bad_request("query", e.body_text()))?
            .0;
        Ok(QueryParams { pairs })
    }
}

impl QueryParams {
    /// The value of a parameter given at most once.
    pub fn one(&mut self, name: &str) -> Result<Option<String>, RestError> {
        let mut values = self.all(name);
        match values.len() {
            0 => Ok(None),
            1 => Ok(values.pop()),
            _ => Err(RestError::bad_request(name, "may be given only once")),
        }
    }

    /// Every value of a repeatable parameter, in order.
    pub fn all(&mut self, name: &str) -> Vec<String> {
        let (taken, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pairs)
            .into_iter()
            .partition(|(k, _)| k == name);
        self.pairs = rest;
        taken.into_iter().map(|(_, v)| v).collect()
    }

    /// A numeric parameter.
    pub fn u64(&mut self, name: &str) -> Result<Option<u64>, RestError> {
        self.one(name)?
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| RestError::bad_request(name, format!("must be a non-negative integer, got {v:?}")))
            })
            .transpose()
    }

    /// Refuses parameters nobody took.
    pub fn finish(self) -> Result<(), RestError> {
        match self.pairs.into_iter().next() {
            None => Ok(()),
            Some((name, _)) => Err(RestError::bad_request(name, "unknown query parameter")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        port: u16,
        #[serde(default)]
        tags: Vec<String>,
    }

    #[test]
    fn a_wrong_type_names_the_field() {
        let e = parse_json::<Probe>(br#"{"port": "80"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("port"));
        let e = parse_json::<Probe>(br#"{"port": 80, "tags": ["a", 3]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tags[1]"));
    }

    #[test]
    fn malformed_json_names_the_body() {
        let e = parse_json::<Probe>(br#"{"port": 80,"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("body"));
        let e = parse_json::<Probe>(b"").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("body"));
        let e = parse_json::<Probe>(br#"{"port": 80} x"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("body"));
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let e = parse_json::<Probe>(br#"{"port": 80, "prot": 1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("prot"));
        let e = parse_json::<Probe>(br#"{}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("port"));
    }

    #[test]
    fn validation_errors_map_to_400_naming_the_field() {
        let e = RestError::from(ApiError::Invalid(muster_core::ValidationError::new("service", "bad")));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.field.as_deref(), Some("service"));
        assert_eq!(
            RestError::from(ApiError::LeaseNotFound(3)).status,
            StatusCode::NOT_FOUND
        );
    }
}
