"""Kafka for the engine: cluster settings, producers, and one shared consumer per cluster.

The engine owns one `KafkaClients`. It lends producers to `kafka_produce` steps (one per
cluster and acks setting, made on first use and replaced after a failure) and runs one
consumer per cluster over every topic a `kafka_consume` step watches. That consumer starts
with the monitor, reads from the end of each topic, belongs to no consumer group, and hands
every record to a callback (the correlator's `offer`) as an `Arrival`. A broker that is down
only fails the steps that need it; both sides reconnect on their own, without a restart.

What is where:

- `settings`: `KafkaCluster`, the `kafka.clusters` config model;
- `errors`: `translate`, the one place aiokafka's exceptions become step failures;
- `cluster`: per cluster, what both sides share (client options, TLS context, `ClusterHealth`);
- `sequence`: the per-key `hopwatch-seq` (`SEQ_HEADER`), stamped on produce, checked on observe;
- `producers`: a cluster's producers and what a send returns (`Produced`);
- `consumer`: a cluster's shared consumer, offering records on `probes.arrivals.channel_name`;
- `clients`: `KafkaClients`, the facade the engine owns and the probes see as a `KafkaPort`.

The package imports nothing itself: the modules but `settings` import aiokafka, and loading
a config (which needs `settings`) must import no Kafka client. Import from the modules.
"""
