"""One file per architecture; each exposes ``DEFAULT_HYPERS`` and ``build``."""
