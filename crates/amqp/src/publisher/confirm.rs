//! [`ConfirmPublisher`]: confirmed, persistent, mandatory publishing on a connection the caller
//! owns.

use super::{OutgoingMessage, PublisherOptions, fail_all};
use crate::error::{AmqpError, Result, short};
use crate::telemetry::{AwaitedConfirm, record_publish};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// A message of a batch sent and awaiting its confirm: its index, the confirm's deadline, the
/// confirm, and the gauge raised for it.
type Sent = (
    usize,
    tokio::time::Instant,
    lapin::PublisherConfirm,
    AwaitedConfirm,
);

/// Publishes with publisher confirms on a channel of its own, and waits for the broker's
/// answer: [`AmqpError::Nacked`], [`AmqpError::Unroutable`] (mandatory publishes that came back)
/// and [`AmqpError::ConfirmTimeout`] are told apart. After any failure the channel is replaced
/// on the next publish.
#[derive(Clone)]
pub struct ConfirmPublisher {
    connection: Arc<Connection>,
    channel: Arc<Mutex<Option<Channel>>>,
    options: PublisherOptions,
}

impl std::fmt::Debug for ConfirmPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfirmPublisher")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ConfirmPublisher {
    /// A publisher on `connection`; every publish is mandatory and waits at most
    /// `confirm_timeout` for its confirm.
    pub fn new(connection: Arc<Connection>, confirm_timeout: Duration) -> Self {
        Self::with_options(
            connection,
            PublisherOptions {
                confirm_timeout,
                ..PublisherOptions::default()
            },
        )
    }

    /// A publisher on `connection` with `options`.
    pub fn with_options(connection: Arc<Connection>, options: PublisherOptions) -> Self {
        ConfirmPublisher {
            connection,
            channel: Arc::new(Mutex::new(None)),
            options,
        }
    }

    /// The connection it publishes on.
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    /// True while the underlying connection is open.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Publishes `messages` with at most `max_outstanding` confirms awaited at once, and returns
    /// one result per message, in order: which ones failed and why. Each confirm has its own
    /// deadline of `confirm_timeout` from its publish. Once the channel fails (a timeout, a lost
    /// connection), the messages not yet sent fail at once with [`AmqpError::Publish`], so a
    /// blocked broker costs a batch about two timeouts, not one per message.
    ///
    /// Returned (unroutable) messages are matched to the batch by their content (exchange,
    /// routing key, message id, body), not by the confirm that happens to carry them: the broker
    /// acknowledges several publishes at once and lapin hands a returned message to the first
    /// confirm it resolves.
    pub async fn publish_batch(
        &self,
        messages: &[OutgoingMessage<'_>],
        max_outstanding: usize,
    ) -> Vec<Result<()>> {
        let mut slot = self.channel.lock().await;
        let channel = match self.open_channel(&mut slot).await {
            Ok(channel) => channel,
            Err(e) => return fail_all(messages, &e),
        };
        let mut results: Vec<Result<()>> = messages.iter().map(|_| Ok(())).collect();
        let mut returned = Vec::new();
        let mut pending: std::collections::VecDeque<Sent> = std::collections::VecDeque::new();
        let mut broken = false;
        for (index, message) in messages.iter().enumerate() {
            if pending.len() >= max_outstanding.max(1)
                && let Some(sent) = pending.pop_front()
            {
                broken |= self
                    .settle_sent(messages, sent, &mut results, &mut returned)
                    .await;
            }
            if broken {
                // The channel failed (a blocked broker, a lost connection): sending the rest would
                // only wait out one timeout each.
                results[index] = Err(AmqpError::Publish(
                    "not sent: an earlier publish of the batch failed".into(),
                ));
                continue;
            }
            let deadline = tokio::time::Instant::now() + self.options.confirm_timeout;
            match self.send(&channel, message, deadline).await {
                Ok(confirm) => {
                    let awaited = AwaitedConfirm::new(message.exchange);
                    pending.push_back((index, deadline, confirm, awaited));
                }
                Err(e) => {
                    broken = true;
                    results[index] = Err(e);
                }
            }
        }
        if !pending.is_empty() {
            // Fault suite: the process dies with the batch sent, its confirms not yet in.
            fail::fail_point!("oncely::publish_before_confirm", |_| std::process::abort());
        }
        for sent in pending {
            broken |= self
                .settle_sent(messages, sent, &mut results, &mut returned)
                .await;
        }
        for back in returned {
            let owner = messages.iter().enumerate().position(|(i, m)| {
                results[i].is_ok()
                    && m.exchange == back.delivery.exchange.as_str()
                    && m.routing_key == back.delivery.routing_key.as_str()
                    && m.properties.message_id() == back.delivery.properties.message_id()
                    && m.body == back.delivery.data.as_slice()
            });
            if let Some(i) = owner {
                results[i] = Err(unroutable(&messages[i], &back));
            }
        }
        if broken {
            *slot = None;
        }
        for (message, result) in messages.iter().zip(&results) {
            record_publish(message.exchange, result);
        }
        results
    }

    /// Waits for one confirm of a batch; a returned message it carries is set aside for matching.
    /// True when the channel can no longer be trusted.
    /// Waits for the confirm of one sent message of a batch and records its result; true when
    /// the channel is broken. The outstanding-confirm gauge is lowered unless the confirm timed
    /// out (then the broker may still answer, and the channel is dropped with it).
    async fn settle_sent(
        &self,
        messages: &[OutgoingMessage<'_>],
        (i, deadline, confirm, awaited): Sent,
        results: &mut [Result<()>],
        returned: &mut Vec<lapin::message::BasicReturnMessage>,
    ) -> bool {
        let broken = self
            .settle_batch_confirm(&messages[i], deadline, confirm, &mut results[i], returned)
            .await;
        if !matches!(results[i], Err(AmqpError::ConfirmTimeout { .. })) {
            awaited.answered();
        }
        broken
    }

    async fn settle_batch_confirm(
        &self,
        message: &OutgoingMessage<'_>,
        deadline: tokio::time::Instant,
        confirm: lapin::PublisherConfirm,
        result: &mut Result<()>,
        returned: &mut Vec<lapin::message::BasicReturnMessage>,
    ) -> bool {
        match tokio::time::timeout_at(deadline, confirm).await {
            Ok(Ok(Confirmation::Ack(back))) => {
                returned.extend(back);
                false
            }
            Ok(Ok(Confirmation::Nack(back))) => {
                returned.extend(back);
                *result = Err(AmqpError::Nacked {
                    exchange: message.exchange.to_owned(),
                    routing_key: message.routing_key.to_owned(),
                });
                false
            }
            Ok(Ok(Confirmation::NotRequested)) => false,
            Ok(Err(e)) => {
                *result = Err(AmqpError::Connection(e));
                true
            }
            Err(_) => {
                *result = Err(self.timeout_error(message));
                true
            }
        }
    }

    async fn send(
        &self,
        channel: &Channel,
        message: &OutgoingMessage<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<lapin::PublisherConfirm> {
        let exchange = short("exchange", message.exchange)?;
        let routing_key = short("routing key", message.routing_key)?;
        let options = BasicPublishOptions {
            mandatory: self.options.mandatory,
            ..BasicPublishOptions::default()
        };
        let properties = crate::cause::stamp(message.properties.clone()).with_delivery_mode(2);
        match tokio::time::timeout_at(
            deadline,
            channel.basic_publish(exchange, routing_key, options, message.body, properties),
        )
        .await
        {
            Ok(Ok(confirm)) => Ok(confirm),
            Ok(Err(e)) => Err(AmqpError::Connection(e)),
            Err(_) => Err(self.timeout_error(message)),
        }
    }

    fn timeout_error(&self, message: &OutgoingMessage<'_>) -> AmqpError {
        AmqpError::ConfirmTimeout {
            exchange: message.exchange.to_owned(),
            routing_key: message.routing_key.to_owned(),
            timeout: self.options.confirm_timeout,
        }
    }

    /// Publishes `message` and waits for the confirm.
    ///
    /// The channel is held for the whole exchange, so that a returned message can only be this
    /// one: concurrent callers take turns (each a round trip).
    pub async fn publish(&self, message: OutgoingMessage<'_>) -> Result<()> {
        let mut slot = self.channel.lock().await;
        let channel = match self.open_channel(&mut slot).await {
            Ok(channel) => channel,
            Err(e) => {
                // A channel that cannot be opened in time is a publish that timed out, and
                // is reported (and counted) as one, with the message's exchange.
                let result = Err(match e {
                    AmqpError::Timeout { .. } => self.timeout_error(&message),
                    other => other,
                });
                record_publish(message.exchange, &result);
                return result;
            }
        };
        // Bound the whole exchange with the broker: a blocked connection holds the publish
        // itself, not only the confirm.
        let deadline = tokio::time::Instant::now() + self.options.confirm_timeout;
        let result = match self.send(&channel, &message, deadline).await {
            Ok(confirm) => {
                let awaited = AwaitedConfirm::new(message.exchange);
                match tokio::time::timeout_at(deadline, confirm).await {
                    Ok(Ok(confirmation)) => {
                        awaited.answered();
                        confirmation_result(&message, confirmation)
                    }
                    Ok(Err(e)) => Err(AmqpError::Connection(e)),
                    Err(_) => Err(self.timeout_error(&message)),
                }
            }
            Err(e) => Err(e),
        };
        record_publish(message.exchange, &result);
        if matches!(
            result,
            Err(AmqpError::Connection(_) | AmqpError::ConfirmTimeout { .. })
        ) {
            // The channel's state is unknown now (a late return could be paired with the next
            // publish): use a fresh one next time.
            *slot = None;
        }
        result
    }

    async fn open_channel(&self, slot: &mut Option<Channel>) -> Result<Channel> {
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let confirm = self.options.confirm_delivery;
        let channel = tokio::time::timeout(self.options.confirm_timeout, async {
            let channel = self.connection.create_channel().await?;
            if confirm {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
            }
            Ok::<_, lapin::Error>(channel)
        })
        .await
        .map_err(|_| AmqpError::Timeout {
            what: "opening a confirm channel".to_owned(),
            timeout: self.options.confirm_timeout,
        })??;
        *slot = Some(channel.clone());
        Ok(channel)
    }
}

fn unroutable(
    message: &OutgoingMessage<'_>,
    back: &lapin::message::BasicReturnMessage,
) -> AmqpError {
    AmqpError::Unroutable {
        exchange: message.exchange.to_owned(),
        routing_key: message.routing_key.to_owned(),
        reply_text: format!("{} {}", back.reply_code, back.reply_text),
    }
}

fn confirmation_result(message: &OutgoingMessage<'_>, confirmation: Confirmation) -> Result<()> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(unroutable(message, &returned))
        }
        Confirmation::Nack(None) => Err(AmqpError::Nacked {
            exchange: message.exchange.to_owned(),
            routing_key: message.routing_key.to_owned(),
        }),
    }
}
