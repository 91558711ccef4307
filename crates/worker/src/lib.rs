//! observer-worker (layout note to be written).
