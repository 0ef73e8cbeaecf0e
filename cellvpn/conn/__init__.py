"""Connections: TLS and its certificates, listening, and the protocol that carries a stream."""
