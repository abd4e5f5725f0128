//! Confirmed, persistent, mandatory publishing.

use crate::error::{AmqpError, Result, short};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct OutgoingMessage<'a> {
    /// Exchange (`""` is the default exchange, which routes by queue name).
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body.
    pub body: &'a [u8],
    /// Properties; delivery mode 2 (persistent) is always set.
    pub properties: BasicProperties,
}

/// Publishes with publisher confirms on a channel of its own, and waits for the broker's
/// answer: [`AmqpError::Nacked`], [`AmqpError::Unroutable`] (mandatory publishes that came back)
/// and [`AmqpError::ConfirmTimeout`] are told apart. After any failure the channel is replaced
/// on the next publish.
#[derive(Clone)]
pub struct ConfirmPublisher {
    connection: Arc<Connection>,
    channel: Arc<Mutex<Option<Channel>>>,
    confirm_timeout: Duration,
    mandatory: bool,
}

impl std::fmt::Debug for ConfirmPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfirmPublisher")
            .field("confirm_timeout", &self.confirm_timeout)
            .field("mandatory", &self.mandatory)
            .finish_non_exhaustive()
    }
}

impl ConfirmPublisher {
    /// A publisher on `connection`; every publish is mandatory and waits at most
    /// `confirm_timeout` for its confirm.
    pub fn new(connection: Arc<Connection>, confirm_timeout: Duration) -> Self {
        ConfirmPublisher {
            connection,
            channel: Arc::new(Mutex::new(None)),
            confirm_timeout,
            mandatory: true,
        }
    }

    /// Publishes `message` and waits for the confirm.
    pub async fn publish(&self, message: OutgoingMessage<'_>) -> Result<()> {
        let channel = self.channel().await?;
        let exchange = short("exchange", message.exchange)?;
        let routing_key = short("routing key", message.routing_key)?;
        let options = BasicPublishOptions {
            mandatory: self.mandatory,
            ..BasicPublishOptions::default()
        };
        let properties = message.properties.with_delivery_mode(2);
        // Bound the whole exchange with the broker: a blocked connection holds the publish
        // itself, not only the confirm.
        let outcome = tokio::time::timeout(self.confirm_timeout, async {
            channel
                .basic_publish(exchange, routing_key, options, message.body, properties)
                .await?
                .await
        })
        .await;
        let failure = match outcome {
            Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => return Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned))))
            | Ok(Ok(Confirmation::Nack(Some(returned)))) => {
                return Err(AmqpError::Unroutable {
                    exchange: message.exchange.to_owned(),
                    routing_key: message.routing_key.to_owned(),
                    reply_text: format!("{} {}", returned.reply_code, returned.reply_text),
                });
            }
            Ok(Ok(Confirmation::Nack(None))) => {
                return Err(AmqpError::Nacked {
                    exchange: message.exchange.to_owned(),
                    routing_key: message.routing_key.to_owned(),
                });
            }
            Ok(Err(e)) => AmqpError::Connection(e),
            Err(_) => AmqpError::ConfirmTimeout {
                exchange: message.exchange.to_owned(),
                routing_key: message.routing_key.to_owned(),
                timeout: self.confirm_timeout,
            },
        };
        // The channel's state is unknown now: use a fresh one next time.
        *self.channel.lock().await = None;
        Err(failure)
    }

    async fn channel(&self) -> Result<Channel> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = tokio::time::timeout(self.confirm_timeout, async {
            let channel = self.connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        })
        .await
        .map_err(|_| AmqpError::ConfirmTimeout {
            exchange: String::new(),
            routing_key: String::new(),
            timeout: self.confirm_timeout,
        })??;
        *slot = Some(channel.clone());
        Ok(channel)
    }
}
