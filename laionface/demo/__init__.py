"""The demo: a generated corpus, the loopback image server that serves it, and `laionface demo`."""
