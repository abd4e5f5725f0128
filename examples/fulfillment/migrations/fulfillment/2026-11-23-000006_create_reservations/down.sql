DROP TABLE reservations;
DROP TABLE reservation_operations;
