"""Running it: settings, start-up (bind, drop privileges, seed, one server or workers), systemd, metrics."""
