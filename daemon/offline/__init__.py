"""Offline tools on the daemon's engine: continue a file, render it (and, as they grow, tune and demo)."""
