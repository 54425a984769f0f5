"""Measuring nets: probes (context-manager instruments), attribution, per-image inspection, init-time stats."""
