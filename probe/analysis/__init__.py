"""Analysis of attention maps: what is computed from recorded or live attention, once, for every reader."""
