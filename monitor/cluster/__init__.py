"""Replicas that share the flows through one Kafka consumer group (`hopwatch run --cluster`).

What is where:

- `settings`: `ClusterSettings`, the `settings.cluster` section and `--cluster` flags (no Kafka
  import: loading a config stays light);
- `ownership`: which control-topic partition owns each flow and each arrival channel;
- `assignor`: the group's partition assignor, which also tells every member who owns what;
- `membership`: joining the group, owning and giving up flows on rebalances, forwarding
  arrivals to their owner over the control topic;
- `wire`: an arrival as a control-topic record;
- `metrics`: `hopwatch_cluster_*` (the API's `GET /api/v1/cluster` asks `Membership.describe`);
- `join`: building a replica's membership from the settings and the flow files' Kafka.

The package imports nothing itself; the modules but `settings` import aiokafka.
"""
