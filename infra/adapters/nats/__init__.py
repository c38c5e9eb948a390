"""NATS: the embedded nats-server and the 3-node test cluster, connecting, provisioning
streams and buckets, settings, publishing issue facts, and the artifact object store."""
