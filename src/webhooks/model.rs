//! What the store keeps of webhooks: the webhooks, their deliveries and each delivery's attempts.

use crate::timestamp::UnixMicros;

/// A webhook as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub webhook_id: String,
    pub workspace_id: String,
    pub url: String,
    /// Empty: every type.
    pub event_types: Vec<String>,
    pub description: String,
    pub create_time: UnixMicros,
    /// The creator's audit display.
    pub created_by: String,
    /// `SigningKeys::check_value` of the key its secret was derived under.
    pub secret_check: String,
}

impl Webhook {
    /// Whether it receives events of this type.
    pub fn wants(&self, event_type: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|wanted| wanted == event_type)
    }
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    Pending,
    Succeeded,
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    pub fn from_db(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(Self::Pending),
            "succeeded" => Some(Self::Succeeded),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// One event on its way to one webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub delivery_id: i64,
    pub webhook_id: String,
    pub position: i64,
    pub event_id: String,
    pub event_type: String,
    pub state: DeliveryState,
    pub redelivery: bool,
    pub create_time: UnixMicros,
    /// The retry period counts from the first attempt.
    pub first_attempt_time: Option<UnixMicros>,
    pub next_attempt_time: Option<UnixMicros>,
    pub attempt_count: i32,
    /// Filled in by listings only, oldest first.
    pub attempts: Vec<Attempt>,
}

/// One HTTP request of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub attempt: i32,
    pub attempt_time: UnixMicros,
    /// 0: no answer.
    pub http_status: i32,
    /// Empty when it succeeded.
    pub error: String,
    pub duration_micros: i64,
}

/// What an attempt leaves its delivery as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    Delivered,
    RetryAt(UnixMicros),
    GaveUp,
}

/// A page of a webhook's deliveries, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryQuery {
    pub webhook_id: String,
    pub state: Option<DeliveryState>,
    /// Deliveries with a smaller id than this.
    pub before_delivery_id: i64,
    pub limit: u32,
}

/// A replica's hold on one webhook: while it lasts, only this replica sends its deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub webhook_id: String,
    /// The replica's random id.
    pub owner: String,
}

/// A webhook a replica claimed, with how far it has queued its workspace's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedWebhook {
    pub webhook: Webhook,
    pub cursor: i64,
}
