//! observer-discord's integration tests, one binary: the client against the
//! simulator and against tiny scripted HTTP servers.

mod limits;
