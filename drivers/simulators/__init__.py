"""Device simulators that speak the real wire protocols on a pseudo-terminal."""
