"""The TUN device: opening it, and reading and writing packets from the reactor."""
