//! Request bodies under a deadline and a size limit, read only when the caller has
//! checked what the headers allow it to check.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use prometheus::IntCounter;
use tokio::time::{Instant, Sleep};

/// The error a body gives once its deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the request body took longer than {0:?} to arrive")]
pub struct BodyTimeout(pub Duration);

/// A request body that must arrive whole within a deadline set when its request's
/// head was read: a client trickling a byte a second is cut, however many it sends.
pub(super) struct Deadline {
    inner: Body,
    deadline: Instant,
    limit: Duration,
    /// Created on the first poll: most requests have no body to wait for.
    sleep: Option<Pin<Box<Sleep>>>,
    timeouts: IntCounter,
    expired: bool,
}

impl Deadline {
    pub(super) fn new(inner: Body, limit: Duration, timeouts: IntCounter) -> Self {
        Self {
            inner,
            deadline: Instant::now() + limit,
            limit,
            sleep: None,
            timeouts,
            expired: false,
        }
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(Some(Err(BodyTimeout(this.limit).into())));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.expired = true;
                this.timeouts.inc();
                Poll::Ready(Some(Err(BodyTimeout(this.limit).into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Larger than the limit: said by its `Content-Length` before any byte was read,
    /// or found while streaming it.
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    /// Not whole within the listener's body timeout.
    #[error("request body not received within {0:?}")]
    TimedOut(Duration),
    /// Not a body at all: bad chunked encoding, a connection closed midway.
    #[error("malformed request body: {0}")]
    Malformed(String),
}

/// Reads `body` whole, at most `limit` bytes, refusing at once a body whose
/// `Content-Length` already says it is larger.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(classify(e.as_ref(), limit)),
    }
}

fn classify(e: &(dyn std::error::Error + 'static), limit: usize) -> BodyError {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.is::<LengthLimitError>() {
            return BodyError::TooLarge(limit);
        }
        if let Some(t) = x.downcast_ref::<BodyTimeout>() {
            return BodyError::TimedOut(t.0);
        }
        cur = x.source();
    }
    // The whole chain: hyper's own message is generic, its source says what was wrong.
    let mut why = e.to_string();
    let mut cur = e.source();
    while let Some(x) = cur {
        why.push_str(": ");
        why.push_str(&x.to_string());
        cur = x.source();
    }
    BodyError::Malformed(why)
}
