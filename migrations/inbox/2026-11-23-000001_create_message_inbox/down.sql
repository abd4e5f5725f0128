DROP TABLE message_inbox;
