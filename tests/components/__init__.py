"""Real test components (clamd, unbound, smtp-sink, a recording SMTP peer) on loopback."""
