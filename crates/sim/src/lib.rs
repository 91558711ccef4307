//! observer-sim (layout note to be written).
