"""The NATS-facing side of pyexec: wire contract, signatures, replies, the client and the CLI."""
