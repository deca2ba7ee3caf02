"""The admin socket: protocol (sans-IO codec), server (glue), client (for ctl and programs)."""
