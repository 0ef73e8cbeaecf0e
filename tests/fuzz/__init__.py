"""cellvpn's fuzz harness: hostile bytes into every decoder and protocol handler."""
