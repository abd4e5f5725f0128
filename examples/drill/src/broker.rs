//! The drill's own view of RabbitMQ: queue depths and what the dead-letter queues hold.

use crate::hostile;
use crate::plan::Names;
use anyhow::Context;
use oncely::lapin::Connection;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Depths of a run's queues, as [`Broker::queue_state`] reads them.
#[derive(Debug, Default)]
pub struct QueueState {
    /// Messages in each topology's DLQ, in [`Names::all`] order.
    pub per_queue: Vec<u32>,
    /// Their sum.
    pub dlq: u32,
    /// Messages ready in work, delay and parking queues.
    pub waiting: u32,
}

/// What a DLQ holds, as [`Broker::dlq_contents`] reads it.
#[derive(Debug, Default)]
pub struct DlqContents {
    /// This run's messages other than the hostile ones (poison, and copies of it).
    pub copies: u32,
    /// The distinct ones among them.
    pub distinct: u32,
    /// Messages of other runs.
    pub others: u32,
    /// This run's hostile messages by marker: the error code of each copy.
    pub hostile: BTreeMap<String, Vec<String>>,
}

/// The drill's own view of the broker: one connection, opened again after a fault closed it.
pub struct Broker {
    url: String,
    name: String,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl Broker {
    pub fn new(url: &str, name: &str) -> Broker {
        Broker {
            url: url.to_owned(),
            name: name.to_owned(),
            connection: tokio::sync::Mutex::default(),
        }
    }

    pub async fn connection(&self) -> anyhow::Result<Arc<Connection>> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref()
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        let c = Arc::new(
            tokio::time::timeout(
                Duration::from_secs(10),
                oncely::amqp::connect(&self.url, &self.name, Default::default()),
            )
            .await
            .context("connecting to RabbitMQ")??,
        );
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Depth of every queue of the run, or None when the broker cannot be asked now.
    pub async fn queue_state(&self, names: &Names) -> Option<QueueState> {
        let connection = self.connection().await.ok()?;
        let mut state = QueueState::default();
        for topology in names.all() {
            let dlq = queue_len(&connection, &topology.dlq()).await?;
            state.per_queue.push(dlq);
            state.dlq += dlq;
            for q in topology.queues() {
                if q != topology.dlq() {
                    state.waiting += queue_len(&connection, &q).await?;
                }
            }
        }
        Some(state)
    }

    /// What `queue` holds of this run: its messages (message id, or without one the body,
    /// naming the run's `prefix`), its hostile messages by marker, and how many messages of
    /// other runs. The messages are read without being acked and go back to the queue when the
    /// channel closes.
    pub async fn dlq_contents(&self, queue: &str, prefix: &str) -> Option<DlqContents> {
        use oncely::lapin::options::BasicGetOptions;
        use oncely::lapin::types::AMQPValue;
        let connection = self.connection().await.ok()?;
        let channel = connection.create_channel().await.ok()?;
        let mut keys = std::collections::HashSet::new();
        let mut contents = DlqContents::default();
        let (mut copies, mut others) = (0u32, 0u32);
        while let Ok(Ok(Some(m))) = tokio::time::timeout(
            Duration::from_secs(5),
            channel.basic_get(queue.into(), BasicGetOptions::default()),
        )
        .await
        {
            let d = m.delivery;
            let header = |name: &str| {
                let value = d.properties.headers().as_ref()?.inner().get(name)?;
                match value {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                }
            };
            match header(hostile::MARKER) {
                Some(marker) if marker.starts_with(prefix) => {
                    let code = header(oncely::headers::ERROR_CODE).unwrap_or_default();
                    contents.hostile.entry(marker).or_default().push(code);
                    continue;
                }
                Some(_) => {
                    others += 1;
                    continue;
                }
                None => {}
            }
            let body = String::from_utf8_lossy(&d.data);
            let key = match d.properties.message_id() {
                Some(id) if id.as_str().contains(prefix) => format!("id:{id}"),
                None if body.contains(prefix) => format!("body:{body}"),
                _ => {
                    others += 1;
                    continue;
                }
            };
            copies += 1;
            keys.insert(key);
        }
        oncely::amqp::close_channel(&channel, 200, "read").await;
        contents.copies = copies;
        contents.distinct = keys.len() as u32;
        contents.others = others;
        Some(contents)
    }

    pub async fn cleanup(&self, names: &Names) {
        let Ok(connection) = self.connection().await else {
            return;
        };
        // Every consumer's topology shares the one exchange: deleting it twice is harmless.
        for topology in names.all() {
            let _ = topology.delete(&connection).await;
        }
    }

    pub async fn close(&self) {
        if let Some(c) = self.connection.lock().await.take() {
            oncely::amqp::close_connection(&c, 200, "drill done").await;
        }
    }
}

async fn queue_len(connection: &Connection, queue: &str) -> Option<u32> {
    // The monitor samples every second: a broker slower than this skips a sample.
    tokio::time::timeout(
        Duration::from_secs(5),
        oncely::amqp::queue_depth(connection, queue),
    )
    .await
    .ok()?
    .ok()
    .map(|depth| depth.messages)
}
