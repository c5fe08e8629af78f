//! Kommune's end-to-end suite. The tests live in `tests/`; see `e2e/README.md` for how to run
//! them against a real API server.
