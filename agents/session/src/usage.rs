//! `GET /api/usage`: what the engine metered for a user today or this month (the store's `usage`
//! collection, documents `<user>/<period>`; see engine/README.md "Usage and budgets").

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::api::{ApiError, ApiErrorCode, Caller};
use crate::server::{query_parameter, AppState};

/// One user's usage in one UTC period. A period nothing was metered in reads as zeros.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UsageReport {
    pub user: String,
    /// `2026-12-01` (a UTC day) or `2026-12` (a UTC month).
    pub period: String,
    /// The profile the charges were made under, when any were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Seconds of sessions holding capacity while running, and while idle (paused).
    pub running_secs: f64,
    pub idle_secs: f64,
    /// CPU-seconds and GiB-seconds of capacity held.
    pub cpu_secs: f64,
    pub gib_secs: f64,
    /// In the profile's price units.
    pub cost: f64,
}

impl UsageReport {
    fn from_document(user: &str, period: &str, document: Option<&Value>) -> UsageReport {
        let number = |name: &str| document.and_then(|document| document.get(name)).and_then(Value::as_f64).unwrap_or(0.0);
        UsageReport {
            user: user.to_owned(),
            period: period.to_owned(),
            profile: document.and_then(|document| document.get("profile")).and_then(Value::as_str).map(str::to_owned),
            running_secs: number("running_secs"),
            idle_secs: number("idle_secs"),
            cpu_secs: number("cpu_secs"),
            gib_secs: number("gib_secs"),
            cost: number("cost"),
        }
    }
}

/// The period key the engine writes for `kind` (`day` or `month`) at `now`.
pub fn period_key(kind: &str, now: chrono::DateTime<chrono::Utc>) -> Option<String> {
    match kind {
        "day" => Some(now.format("%Y-%m-%d").to_string()),
        "month" => Some(now.format("%Y-%m").to_string()),
        _ => None,
    }
}

/// `GET /api/usage?period=day|month`: the caller's usage in the current UTC day or month; an admin
/// may add `user=`.
#[utoipa::path(
    get, path = "/api/usage", tag = "sessions",
    params(("period" = Option<String>, Query, description = "`day` (default: today, UTC) or `month` (this month, UTC)"),
           ("user" = Option<String>, Query, description = "Admins only: this user's usage")),
    responses(
        (status = 200, description = "The metered usage; zeros when nothing was metered", body = UsageReport),
        (status = 400, description = "`period` is neither `day` nor `month`", body = ApiError),
        (status = 401, description = "No valid token", body = ApiError),
        (status = 403, description = "`user` without the admin role", body = ApiError),
        (status = 503, description = "The store did not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn usage(State(state): State<Arc<AppState>>, Caller(identity): Caller, RawQuery(query): RawQuery) -> Response {
    let kind = query_parameter(query.as_deref(), "period").unwrap_or_else(|| "day".to_owned());
    let Some(period) = period_key(&kind, chrono::Utc::now()) else {
        return ApiError::new(ApiErrorCode::BadRequest, format!("period must be `day` or `month`, not {kind:?}")).into_response();
    };
    let user = query_parameter(query.as_deref(), "user").unwrap_or_else(|| identity.user.clone());
    if user != identity.user && !identity.is_admin() {
        return ApiError::new(ApiErrorCode::Forbidden, "only admins see other users' usage").into_response();
    }
    let id = format!("{user}/{period}");
    match state.store.document(protocol::store::collections::USAGE, &id).await {
        Ok(document) => (StatusCode::OK, Json(UsageReport::from_document(&user, &period, document.as_ref()))).into_response(),
        Err(crate::error::Error::StoreRefused { kind, .. }) if kind == "not_found" => {
            Json(UsageReport::from_document(&user, &period, None)).into_response()
        }
        Err(error) => ApiError::new(ApiErrorCode::Unavailable, format!("cannot read usage: {error}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn periods_are_the_engines_keys() {
        let now = chrono::Utc.with_ymd_and_hms(2026, 12, 1, 23, 59, 0).unwrap();
        assert_eq!(period_key("day", now).as_deref(), Some("2026-12-01"));
        assert_eq!(period_key("month", now).as_deref(), Some("2026-12"));
        assert_eq!(period_key("year", now), None);
        let report = UsageReport::from_document("alice", "2026-12", Some(&serde_json::json!({"cost": 1.5, "running_secs": 60})));
        assert_eq!((report.cost, report.running_secs, report.idle_secs), (1.5, 60.0, 0.0));
    }
}
