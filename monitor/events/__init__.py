"""Events out: run results and incident changes published to Kafka as CloudEvents 1.0.

The settings (`settings.py`) load without aiokafka; the sink (`sink.py`) is imported by the
engine only when `settings.events` is set.
"""
