"""The bundled demo system hopwatch watches in `hopwatch demo` (a shop API, its worker, its
webhook sender) and the Kafka-protocol broker it runs on, kept apart from the engine's modules."""
