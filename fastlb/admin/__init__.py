"""The admin socket: protocol (sans-IO codec), guard (sans-IO defences: token file, backoff,
rate-limited lines), server (glue), client (for ctl and programs)."""
