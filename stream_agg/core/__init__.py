"""Pure, deterministic aggregation logic: no Kafka, no database, no wall clock reads."""
