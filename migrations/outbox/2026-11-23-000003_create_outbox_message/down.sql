DROP TRIGGER outbox_message_notify ON outbox_message;
DROP FUNCTION oncely_outbox_notify();
DROP TABLE outbox_message;
