//! observer-api (layout note to be written).
